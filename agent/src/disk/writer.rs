//! Where bytes go: the [`DiskWriter`] trait (so tests can inject short writes and failures)
//! and [`FileDisk`], the real block device or plain file.
//!
//! `FileDisk` writes large aligned buffers with O_DIRECT (through a second descriptor; the
//! first, buffered one takes unaligned pieces and is the fallback where O_DIRECT is refused,
//! e.g. tmpfs), turns zero ranges into BLKZEROOUT on block devices and punched holes in plain
//! files (writing zeros where neither works), and re-reads the partition table at the end.
//! This module is the disk edge: the only image-path code that issues ioctls.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::SelectedDisk;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {} for writing", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} refused a write of {len} bytes at byte {offset}", path.display())]
    Write {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {} at byte {offset}", path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot zero {len} bytes of {} at byte {offset}", path.display())]
    Zero {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot flush {} to stable storage", path.display())]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot re-read the partition table of {}", path.display())]
    Reread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where image bytes go. A trait so tests can inject short writes and failures at chosen
/// offsets.
pub trait DiskWriter: Send {
    fn path(&self) -> &Path;
    /// Capacity in bytes.
    fn size(&self) -> u64;
    /// Writes a prefix of `buf` at `offset` and says how much (a short write is not an error;
    /// 0 for a non-empty buffer is).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<usize, DiskError>;
    fn sync(&mut self) -> Result<(), DiskError>;
    /// Reads exactly `buf.len()` bytes at `offset` (partition tables and signatures, for
    /// cleaning and the config drive).
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let _ = buf;
        Err(DiskError::Read {
            path: self.path().to_path_buf(),
            offset,
            source: io::Error::from(io::ErrorKind::Unsupported),
        })
    }
    /// Makes `[offset, offset + len)` read back as zeros without writing data, when the
    /// target can guarantee that (see [`super::wipe::erase_full`]). `Ok(None)`: it cannot;
    /// the caller writes zeros. `Ok(Some(how))` names the method used.
    fn zero_fast(&mut self, offset: u64, len: u64) -> Result<Option<&'static str>, DiskError> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Writes all of `buf` at `offset`, retrying short writes.
    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = self.write_at(at, &buf[done..])?;
            if n == 0 {
                return Err(DiskError::Write {
                    path: self.path().to_path_buf(),
                    offset: at,
                    len: buf.len() - done,
                    source: io::Error::new(io::ErrorKind::WriteZero, "the device wrote nothing"),
                });
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `parts` back to back from `offset`, all of them, as few writes as the target
    /// allows. The default writes them one by one.
    fn write_all_vectored_at(&mut self, offset: u64, parts: &[&[u8]]) -> Result<(), DiskError> {
        sequential(self, offset, parts)
    }

    /// Makes `[offset, offset + len)` read as zeros. The default writes zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        write_zero_bytes(self, offset, len)
    }

    /// A second handle on the same disk, for writes from another thread (see
    /// `image::inflight`); `None` where there is none (then one thread writes everything).
    fn try_clone(&self) -> Option<Box<dyn DiskWriter>> {
        None
    }

    /// Tells the kernel the partition table changed (nothing for plain files and fakes).
    fn reread_partitions(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

/// Most parts one vectored write takes (Linux's IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

/// `parts` one after another, each with `write_all_at`.
fn sequential<W: DiskWriter + ?Sized>(
    w: &mut W,
    offset: u64,
    parts: &[&[u8]],
) -> Result<(), DiskError> {
    let mut at = offset;
    for p in parts {
        w.write_all_at(at, p)?;
        at += p.len() as u64;
    }
    Ok(())
}

/// Zeroes a range by writing zeros.
pub fn write_zero_bytes<W: DiskWriter + ?Sized>(
    w: &mut W,
    offset: u64,
    len: u64,
) -> Result<(), DiskError> {
    static ZEROS: [u8; 256 << 10] = [0; 256 << 10];
    let mut at = offset;
    let end = offset.saturating_add(len);
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64) as usize;
        w.write_all_at(at, &ZEROS[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Alignment of O_DIRECT writes (offset, length and memory): 4 KiB suits 512-byte and
/// 4 KiB-sector devices alike.
pub const DIRECT_ALIGN: u64 = 4096;

// ioctl number from <linux/fs.h>: _IO(0x12, 95).
const BLKRRPART: libc::c_ulong = 0x125f;

/// A block device or a plain file.
pub struct FileDisk {
    file: File,
    /// The same file opened with O_DIRECT, while the kernel accepts it.
    direct: Option<File>,
    path: PathBuf,
    size: u64,
    block_device: bool,
    /// Whether BLKZEROOUT / hole punching still work here.
    fast_zero: bool,
}

impl FileDisk {
    /// Opens the selected disk for writing. Never creates or truncates anything.
    pub fn open(disk: &SelectedDisk) -> Result<FileDisk, DiskError> {
        FileDisk::open_path(disk.path())
    }

    fn open_path(path: &Path) -> Result<FileDisk, DiskError> {
        let path = path.to_path_buf();
        let err = |source| DiskError::Open {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(err)?;
        // Seeking to the end gives the size of block devices and files alike.
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        let block_device = file.metadata().map_err(err)?.file_type().is_block_device();
        // tmpfs and some filesystems refuse O_DIRECT (EINVAL): then everything is buffered.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok();
        Ok(FileDisk {
            file,
            direct,
            path,
            size,
            block_device,
            fast_zero: true,
        })
    }

    /// Whether large aligned writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn wrap(&self, offset: u64, len: usize, source: io::Error) -> DiskError {
        DiskError::Write {
            path: self.path.clone(),
            offset,
            len,
            source,
        }
    }
}

impl DiskWriter for FileDisk {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<usize, DiskError> {
        let aligned = offset.is_multiple_of(DIRECT_ALIGN)
            && (buf.len() as u64).is_multiple_of(DIRECT_ALIGN)
            && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize);
        if aligned && let Some(direct) = &self.direct {
            let refused = loop {
                match direct.write_at(buf, offset) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break e,
                    Err(e) => return Err(self.wrap(offset, buf.len(), e)),
                }
            };
            tracing::warn!(
                "{}: O_DIRECT write refused ({refused}); writing through the page cache",
                self.path.display()
            );
            self.direct = None;
        }
        loop {
            match self.file.write_at(buf, offset) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.wrap(offset, buf.len(), e)),
            }
        }
    }

    /// One `pwritev` per call where every part is aligned for O_DIRECT: a disk kept busy
    /// with one 8 MiB write finishes sooner than with four of 2 MiB in turn (measured on a
    /// loop device, see ARCHITECTURE.md). Anything else goes part by part through `write_at`.
    fn write_all_vectored_at(&mut self, offset: u64, parts: &[&[u8]]) -> Result<(), DiskError> {
        let aligned = |p: &&[u8]| {
            (p.len() as u64).is_multiple_of(DIRECT_ALIGN)
                && (p.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize)
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if parts.len() < 2
            || parts.len() > MAX_IOV
            || !offset.is_multiple_of(DIRECT_ALIGN)
            || !parts.iter().all(aligned)
        {
            return sequential(self, offset, parts);
        }
        let Some(direct) = &self.direct else {
            return sequential(self, offset, parts);
        };
        let mut iov: Vec<io::IoSlice> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut slices: &mut [io::IoSlice] = &mut iov;
        let mut done = 0usize;
        while done < total {
            let at = offset + done as u64;
            match nix::sys::uio::pwritev(direct, slices, at as libc::off_t) {
                Ok(0) => {
                    return Err(self.wrap(
                        at,
                        total - done,
                        io::Error::new(io::ErrorKind::WriteZero, "the device wrote nothing"),
                    ));
                }
                Ok(n) => {
                    done += n;
                    io::IoSlice::advance_slices(&mut slices, n);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                // Refused as a whole (alignment the device does not take): part by part,
                // where `write_at` falls back to the page cache.
                Err(nix::errno::Errno::EINVAL) if done == 0 => {
                    return sequential(self, offset, parts);
                }
                Err(e) => return Err(self.wrap(at, total - done, io::Error::from(e))),
            }
        }
        Ok(())
    }

    fn try_clone(&self) -> Option<Box<dyn DiskWriter>> {
        let file = self.file.try_clone().ok()?;
        let direct = match &self.direct {
            Some(d) => Some(d.try_clone().ok()?),
            None => None,
        };
        Some(Box::new(FileDisk {
            file,
            direct,
            path: self.path.clone(),
            size: self.size,
            block_device: self.block_device,
            fast_zero: self.fast_zero,
        }))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        // The fast paths need 512-byte alignment; the ragged edges are written.
        let start = offset.div_ceil(512) * 512;
        let end = (offset + len) / 512 * 512;
        if self.fast_zero && end > start {
            match super::erase::zero_fast(&self.file, start, end - start) {
                Ok(Some(_)) => {
                    write_zero_bytes(self, offset, start - offset)?;
                    return write_zero_bytes(self, end, offset + len - end);
                }
                Ok(None) => self.fast_zero = false,
                Err(source) => {
                    return Err(DiskError::Zero {
                        path: self.path.clone(),
                        offset: start,
                        len: end - start,
                        source,
                    });
                }
            }
        }
        write_zero_bytes(self, offset, len)
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| DiskError::Read {
                path: self.path.clone(),
                offset,
                source,
            })
    }

    fn zero_fast(&mut self, offset: u64, len: u64) -> Result<Option<&'static str>, DiskError> {
        super::erase::zero_fast(&self.file, offset, len).map_err(|source| DiskError::Zero {
            path: self.path.clone(),
            offset,
            len,
            source,
        })
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        let err = |source| DiskError::Sync {
            path: self.path.clone(),
            source,
        };
        if let Some(d) = &self.direct {
            d.sync_all().map_err(err)?;
        }
        self.file.sync_all().map_err(err)
    }

    fn reread_partitions(&mut self) -> Result<(), DiskError> {
        if !self.block_device {
            return Ok(());
        }
        // SAFETY: BLKRRPART takes no argument; fd is open for the life of self.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKRRPART as _) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Loop devices without partition scanning, and devices that have no partitions.
            Some(libc::EINVAL | libc::ENOTTY) => Ok(()),
            // A partition is in use: the kernel keeps the old table until reboot. The disk
            // itself is correct, so this is a warning, not a failed write.
            Some(libc::EBUSY) => {
                tracing::warn!(
                    "{}: partition table re-read refused (busy); the kernel sees the new \
                     partitions after a reboot",
                    self.path.display()
                );
                Ok(())
            }
            _ => Err(DiskError::Reread {
                path: self.path.clone(),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_disk_writes_aligned_and_unaligned_and_punches_holes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("d");
        std::fs::write(&p, vec![0xaau8; 1 << 20]).unwrap();
        let mut d = FileDisk::open_path(&p).unwrap();
        assert_eq!(d.size(), 1 << 20);
        // Aligned (direct where the filesystem allows it): a Vec of 8 KiB is page aligned
        // only by luck, so write from an aligned slice of a bigger one.
        let mut big = vec![0x11u8; 16384];
        let off = big.as_ptr().align_offset(4096);
        let aligned = &mut big[off..off + 8192];
        aligned.fill(0x22);
        d.write_all_at(8192, aligned).unwrap();
        d.write_all_at(3, b"abc").unwrap();
        d.write_zeroes(100_000, 300_000).unwrap();
        d.sync().unwrap();
        d.reread_partitions().unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(&got[3..6], b"abc");
        assert!(got[8192..16384].iter().all(|b| *b == 0x22));
        assert!(got[100_000..400_000].iter().all(|b| *b == 0));
        assert_eq!(got[99_999], 0xaa);
        assert_eq!(got[400_000], 0xaa);
    }

    #[test]
    fn file_disk_writes_parts_back_to_back_aligned_or_not() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("d");
        std::fs::write(&p, vec![0xaau8; 1 << 20]).unwrap();
        let mut d = FileDisk::open_path(&p).unwrap();
        let mut big = vec![0u8; 64 << 10];
        let off = big.as_ptr().align_offset(4096);
        let (a, rest) = big[off..off + (48 << 10)].split_at_mut(16 << 10);
        let (b, c) = rest.split_at_mut(4096);
        a.fill(1);
        b.fill(2);
        c.fill(3);
        // Aligned parts, one pwritev where the filesystem takes O_DIRECT.
        d.write_all_vectored_at(8192, &[a, b, c]).unwrap();
        // Unaligned parts and offset: written one by one, through the page cache.
        d.write_all_vectored_at(500_001, &[b"xy", b"", b"z"])
            .unwrap();
        d.sync().unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got[8191], 0xaa);
        assert!(got[8192..8192 + (16 << 10)].iter().all(|x| *x == 1));
        assert!(got[(24 << 10)..(28 << 10)].iter().all(|x| *x == 2));
        assert!(got[(28 << 10)..(56 << 10)].iter().all(|x| *x == 3));
        assert_eq!(got[56 << 10], 0xaa);
        assert_eq!(&got[500_000..500_005], &[0xaa, b'x', b'y', b'z', 0xaa]);
        assert_eq!(got.len(), 1 << 20);
    }
}
