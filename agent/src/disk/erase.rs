//! The kernel edge of full erase: discard, `BLKZEROOUT`, hole punching.
//!
//! Discard alone does not promise zeros (the kernel dropped `discard_zeroes_data` as a
//! guarantee in 4.12; it now always reads 0), so discard is used only where the queue still
//! says discarded blocks read as zeros. Otherwise `BLKZEROOUT`, which the kernel turns into
//! WRITE ZEROES / unmap-with-zeroing where the device has it and into written zeros where it
//! does not: either way the range reads back as zeros. A plain file gets a punched hole.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Ranges handed to one ioctl, so a huge disk is not one uninterruptible call.
const STEP: u64 = 1 << 30;

nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

type RangeIoctl = unsafe fn(i32, *const [u64; 2]) -> nix::Result<i32>;

/// Zeroes `[offset, offset + len)` without writing data where the target allows; `Ok(None)`
/// when it cannot (the caller writes zeros).
pub fn zero_fast(file: &File, offset: u64, len: u64) -> io::Result<Option<&'static str>> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        if len == 0 {
            return Ok(Some("punch-hole"));
        }
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        return match nix::fcntl::fallocate(file, flags, offset as i64, len as i64) {
            Ok(()) => Ok(Some("punch-hole")),
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        };
    }
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let queue = format!(
        "/sys/dev/block/{}:{}/queue",
        libc::major(meta.rdev()),
        libc::minor(meta.rdev())
    );
    let read_u64 = |name: &str| {
        std::fs::read_to_string(format!("{queue}/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let discard_zeroes = read_u64("discard_zeroes_data") == 1 && read_u64("discard_max_bytes") > 0;
    let (ioctl, name): (RangeIoctl, _) = if discard_zeroes {
        (blkdiscard, "discard")
    } else {
        (blkzeroout, "zeroout")
    };
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(STEP);
        let range = [at, n];
        // SAFETY: the ioctl reads two u64 from a pointer valid for the call; fd is open.
        match unsafe { ioctl(file.as_raw_fd(), &range) } {
            Ok(_) => {}
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOTTY) if at == offset => {
                return Ok(None);
            }
            Err(e) => return Err(io::Error::from(e)),
        }
        at += n;
    }
    Ok(Some(name))
}
