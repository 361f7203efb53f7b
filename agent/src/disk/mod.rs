//! Choosing disks, and the only ways to write to them.
//!
//! Invariant: every destructive operation takes a [`SelectedDisk`], and a `SelectedDisk` can
//! only be made by [`select_root_disk`] (the metal3 root device hints matched against the
//! inventory) or [`select_for_cleaning`]. No code path can write to a disk nobody chose.
//!
//! - [`select`]: hints, matching, the selection.
//! - [`writer`]: the [`DiskWriter`] trait and the real block-device/file writer.
//! - [`layout`]: partition tables (MBR with logical partitions, GPT) read from the disk's
//!   bytes; pure.
//! - [`partition`]: adding a partition at the end of a disk's table; pure.
//! - [`wipe`]: metadata cleaning (planned from the bytes, then zeroed) and full erase;
//!   `erase` is its kernel edge (discard, BLKZEROOUT, hole punching).

mod erase;
pub mod layout;
pub mod partition;
mod select;
mod wipe;
mod writer;

pub use select::{
    DEFAULT_MIN_ROOT_BYTES, Hints, NoMatch, SelectedDisk, human, mismatches, select_for_cleaning,
    select_root_disk,
};
pub use wipe::{
    Area, Erased, WIPE_BYTES, Wiped, erase_full, plan_metadata_wipe, reread_partitions,
    wipe_metadata, zero_ends, zero_range,
};
pub use writer::{DiskError, DiskWriter, FileDisk};

/// Reads a disk through its [`DiskWriter`], for the pure planners of [`layout`],
/// [`partition`] and [`wipe`].
pub struct Reader<'a>(pub &'a mut dyn DiskWriter);

impl layout::ReadAt for Reader<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0
            .read_exact_at(offset, buf)
            .map_err(|e| std::io::Error::other(chain(&e)))
    }
}

pub(crate) use crate::error_chain as chain;
