//! Where bytes go: the [`DiskWriter`] trait (so tests can inject short writes and failures)
//! and [`FileDisk`], the real block device or plain file.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
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
    #[error("{} refused to zero bytes {offset}..{end}", path.display())]
    Zero {
        path: PathBuf,
        offset: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot flush {} to stable storage", path.display())]
    Sync {
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
    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError>;
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
}

/// A block device or a plain file.
pub struct FileDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileDisk {
    /// Opens the selected disk for writing. Never creates or truncates anything.
    pub fn open(disk: &SelectedDisk) -> Result<FileDisk, DiskError> {
        let path = disk.path().to_path_buf();
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
        Ok(FileDisk { file, path, size })
    }
}

impl DiskWriter for FileDisk {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| DiskError::Write {
                path: self.path.clone(),
                offset,
                len: buf.len(),
                source,
            })
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
            end: offset + len,
            source,
        })
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        self.file.sync_all().map_err(|source| DiskError::Sync {
            path: self.path.clone(),
            source,
        })
    }
}
