//! Booting the installed OS without the firmware: find its kernel, initrd and command line in
//! the boot configuration of the disk just written, so [`crate::sys::kexec_load`] can load
//! them and the power step reboots straight into them (no POST, no PXE).
//!
//! Reads syslinux and extlinux configurations on FAT partitions, through `fatfs` over a
//! read-only view of the partition: nothing here can write to the disk. The parser is pure.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::disk::layout::{self, ReadAt};

/// Where syslinux and extlinux look for their configuration, relative to the partition root.
const CONFIGS: [&str; 6] = [
    "syslinux.cfg",
    "syslinux/syslinux.cfg",
    "boot/syslinux/syslinux.cfg",
    "extlinux.conf",
    "extlinux/extlinux.conf",
    "boot/extlinux/extlinux.conf",
];

/// Largest kernel or initrd read into memory.
const MAX_FILE: u64 = 512 << 20;

/// The entry a boot loader configuration boots by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Path of the kernel, from the partition root.
    pub kernel: String,
    /// Initrds, from the partition root, in order (loaded concatenated, as the boot loaders do).
    pub initrds: Vec<String>,
    pub append: String,
}

/// The default entry of a syslinux/extlinux configuration whose file is in `dir` (relative
/// paths are resolved from there). `None` when it names no kernel.
pub fn parse_syslinux(text: &str, dir: &str) -> Option<BootEntry> {
    struct Label {
        name: String,
        kernel: Option<String>,
        initrd: Option<String>,
        append: String,
    }
    let mut default: Option<String> = None;
    let mut labels: Vec<Label> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(char::is_whitespace) {
            Some((k, v)) => (k.to_ascii_lowercase(), v.trim()),
            None => (line.to_ascii_lowercase(), ""),
        };
        match key.as_str() {
            "default" => default = Some(value.to_string()),
            "label" => labels.push(Label {
                name: value.to_string(),
                kernel: None,
                initrd: None,
                append: String::new(),
            }),
            "kernel" | "linux" => {
                if let Some(l) = labels.last_mut() {
                    l.kernel = Some(value.to_string());
                }
            }
            "initrd" => {
                if let Some(l) = labels.last_mut() {
                    l.initrd = Some(value.to_string());
                }
            }
            "append" => {
                if let Some(l) = labels.last_mut() {
                    l.append = value.to_string();
                }
            }
            _ => {}
        }
    }
    let resolve = |p: &str| -> String {
        let p = p.trim();
        if let Some(abs) = p.strip_prefix('/') {
            abs.to_string()
        } else if dir.is_empty() {
            p.to_string()
        } else {
            format!("{dir}/{p}")
        }
    };
    let chosen = match &default {
        Some(d) => labels
            .iter()
            .find(|l| l.name == *d)
            .or_else(|| labels.first()),
        None => labels.first(),
    };
    let (kernel, initrd, append) = match chosen {
        Some(l) => (l.kernel.clone()?, l.initrd.clone(), l.append.clone()),
        // `DEFAULT kernel args...` without labels: the value is a kernel and its arguments.
        None => {
            let d = default?;
            let mut words = d.splitn(2, char::is_whitespace);
            let k = words.next()?.to_string();
            (k, None, words.next().unwrap_or("").trim().to_string())
        }
    };
    // `initrd=` inside APPEND is the older way to name initrds; the kernel must not see it.
    let mut initrds: Vec<String> = initrd
        .iter()
        .flat_map(|i| i.split(','))
        .filter(|i| !i.trim().is_empty())
        .map(resolve)
        .collect();
    let mut args = Vec::new();
    for word in append.split_whitespace() {
        match word.strip_prefix("initrd=") {
            Some(list) if initrds.is_empty() => {
                initrds.extend(list.split(',').filter(|i| !i.is_empty()).map(resolve));
            }
            Some(_) => {}
            None => args.push(word),
        }
    }
    Some(BootEntry {
        kernel: resolve(&kernel),
        initrds,
        append: args.join(" "),
    })
}

/// What [`find`] found: the entry and the bytes it names.
pub struct Found {
    pub entry: BootEntry,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    /// e.g. "syslinux.cfg on partition 1 of /dev/vda".
    pub source: String,
}

/// Finds the default boot entry on `device` and reads its kernel and initrds. The error says
/// what was looked at, for the command result.
pub fn find(device: &Path) -> Result<Found, String> {
    let file = File::open(device).map_err(|e| format!("cannot open {}: {e}", device.display()))?;
    let size = file
        .metadata()
        .map(|m| m.len())
        .ok()
        .filter(|s| *s > 0)
        .or_else(|| {
            let mut f = &file;
            f.seek(SeekFrom::End(0)).ok()
        })
        .unwrap_or(0);
    let mut disk = DiskRead { file: &file, size };
    let table = layout::read_layout(&mut disk, 512)
        .map_err(|e| {
            format!(
                "cannot read the partition table of {}: {e}",
                device.display()
            )
        })?
        .ok_or_else(|| format!("{} has no partition table", device.display()))?;
    let mut looked = Vec::new();
    for (i, p) in table.partitions.iter().enumerate() {
        let part = PartRead {
            file: &file,
            start: p.start,
            len: p.len,
            pos: 0,
        };
        let Ok(fs) = fatfs::FileSystem::new(part, fatfs::FsOptions::new()) else {
            continue;
        };
        looked.push(format!("partition {}", i + 1));
        let root = fs.root_dir();
        for cfg in CONFIGS {
            let Ok(mut f) = root.open_file(cfg) else {
                continue;
            };
            let mut text = String::new();
            if f.read_to_string(&mut text).is_err() {
                continue;
            }
            let dir = cfg.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let source = format!("{cfg} on partition {} of {}", i + 1, device.display());
            let entry = parse_syslinux(&text, dir)
                .ok_or_else(|| format!("{source} names no kernel for its default entry"))?;
            let read = |path: &str| -> Result<Vec<u8>, String> {
                let mut f = root
                    .open_file(path)
                    .map_err(|e| format!("{source} names {path}, which cannot be opened: {e}"))?;
                let mut data = Vec::new();
                (&mut f)
                    .take(MAX_FILE)
                    .read_to_end(&mut data)
                    .map_err(|e| format!("cannot read {path} ({source}): {e}"))?;
                Ok(data)
            };
            let kernel = read(&entry.kernel)?;
            let mut initrd = Vec::new();
            for i in &entry.initrds {
                initrd.extend(read(i)?);
            }
            return Ok(Found {
                entry,
                kernel,
                initrd,
                source,
            });
        }
    }
    Err(if looked.is_empty() {
        format!(
            "no FAT partition on {} (kexec reads syslinux and extlinux configurations on FAT \
             partitions only)",
            device.display()
        )
    } else {
        format!(
            "no syslinux or extlinux configuration on the FAT {} of {}",
            looked.join(", "),
            device.display()
        )
    })
}

/// The whole disk, for the partition table.
struct DiskRead<'a> {
    file: &'a File,
    size: u64,
}

impl ReadAt for DiskRead<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// One partition as a stream for `fatfs`. Read-only: every write fails, so reading a boot
/// configuration can never change the disk.
struct PartRead<'a> {
    file: &'a File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for PartRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for PartRead<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match pos {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}

impl Write for PartRead<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the boot partition is opened read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslinux_default_label_with_initrd_and_append() {
        let cfg = "SERIAL 0 115200\nDEFAULT os\nPROMPT 0\nTIMEOUT 1\nLABEL rescue\n  LINUX /r\nLABEL os\n  LINUX /vmlinuz\n  INITRD /initrd\n  APPEND console=tty0 console=ttyS0,115200 panic=5\n";
        assert_eq!(
            parse_syslinux(cfg, ""),
            Some(BootEntry {
                kernel: "vmlinuz".into(),
                initrds: vec!["initrd".into()],
                append: "console=tty0 console=ttyS0,115200 panic=5".into(),
            })
        );
    }

    #[test]
    fn extlinux_relative_paths_initrd_in_append_and_first_label() {
        let cfg = "# comment\nmenu title Boot\nlabel linux\n  kernel ../vmlinuz-6.1\n  append root=UUID=1234 ro initrd=../initrd-a.img,../initrd-b.img quiet\nlabel old\n  kernel /old\n";
        assert_eq!(
            parse_syslinux(cfg, "boot/extlinux"),
            Some(BootEntry {
                kernel: "boot/extlinux/../vmlinuz-6.1".into(),
                initrds: vec![
                    "boot/extlinux/../initrd-a.img".into(),
                    "boot/extlinux/../initrd-b.img".into()
                ],
                append: "root=UUID=1234 ro quiet".into(),
            })
        );
    }

    #[test]
    fn default_without_labels_is_a_kernel_with_arguments() {
        assert_eq!(
            parse_syslinux("DEFAULT /bzImage root=/dev/sda1", ""),
            Some(BootEntry {
                kernel: "bzImage".into(),
                initrds: vec![],
                append: "root=/dev/sda1".into(),
            })
        );
    }

    #[test]
    fn nothing_to_boot() {
        assert_eq!(parse_syslinux("", ""), None);
        assert_eq!(parse_syslinux("LABEL x\n APPEND quiet\n", ""), None);
        assert_eq!(parse_syslinux("\u{0}\u{ffff}garbage", ""), None);
    }

    /// A FAT partition made by the same crate, inside an MBR disk image: found and read; a disk
    /// without one is a clear error; the disk is unchanged either way.
    #[test]
    fn finds_the_entry_on_a_fat_partition_and_writes_nothing() {
        let part_start = 1u64 << 20;
        let part_len = 8u64 << 20;
        let mut fat = io::Cursor::new(vec![0u8; part_len as usize]);
        fatfs::format_volume(&mut fat, fatfs::FormatVolumeOptions::new()).unwrap();
        {
            let fs = fatfs::FileSystem::new(&mut fat, fatfs::FsOptions::new()).unwrap();
            let root = fs.root_dir();
            let put = |name: &str, data: &[u8]| {
                root.create_file(name).unwrap().write_all(data).unwrap();
            };
            put(
                "syslinux.cfg",
                b"DEFAULT os\nLABEL os\n LINUX /vmlinuz\n INITRD /initrd\n APPEND panic=5\n",
            );
            put("vmlinuz", b"KERNEL BYTES");
            put("initrd", b"INITRD BYTES");
        }
        let mut disk = vec![0u8; (part_start + part_len + (1 << 20)) as usize];
        disk[part_start as usize..(part_start + part_len) as usize].copy_from_slice(fat.get_ref());
        // One MBR entry: type 0x0c (FAT32 LBA), start and length in 512-byte sectors.
        let e = 446;
        disk[e + 4] = 0x0c;
        disk[e + 8..e + 12].copy_from_slice(&((part_start / 512) as u32).to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&((part_len / 512) as u32).to_le_bytes());
        disk[510] = 0x55;
        disk[511] = 0xaa;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("disk.img");
        std::fs::write(&path, &disk).unwrap();

        let found = find(&path).unwrap();
        assert_eq!(found.kernel, b"KERNEL BYTES");
        assert_eq!(found.initrd, b"INITRD BYTES");
        assert_eq!(found.entry.append, "panic=5");
        assert!(
            found.source.contains("syslinux.cfg on partition 1"),
            "{}",
            found.source
        );
        assert!(
            std::fs::read(&path).unwrap() == disk,
            "the disk was modified"
        );

        // No FAT partition: a reason, not a guess.
        let blank = t.path().join("blank.img");
        let mut other = disk.clone();
        other[part_start as usize..(part_start + part_len) as usize].fill(0);
        std::fs::write(&blank, &other).unwrap();
        let err = find(&blank).err().unwrap();
        assert!(err.contains("no FAT partition"), "{err}");
    }
}
