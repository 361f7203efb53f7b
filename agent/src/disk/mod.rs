//! Choosing disks, and the only ways to write to them.
//!
//! Invariant: every destructive operation takes a [`SelectedDisk`], and a `SelectedDisk` can
//! only be made by [`select_root_disk`] (the metal3 root device hints matched against the
//! inventory) or [`select_for_cleaning`]. No code path can write to a disk nobody chose.
//!
//! - [`select`]: hints, matching, the selection.
//! - [`writer`]: the [`DiskWriter`] trait and the real block-device/file writer.
//! - [`wipe`]: metadata cleaning.

mod select;
mod wipe;
mod writer;

pub use select::{
    DEFAULT_MIN_ROOT_BYTES, Hints, NoMatch, SelectedDisk, human, mismatches, select_for_cleaning,
    select_root_disk,
};
pub use wipe::{WIPE_BYTES, wipe_metadata, zero_ends};
pub use writer::{DiskError, DiskWriter, FileDisk};
