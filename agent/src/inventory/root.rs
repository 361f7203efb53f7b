//! Reading the machine's files under a root path, and capturing exactly what was read.
//!
//! Every collector reads through [`Root`] with paths relative to the root (`sys/block`,
//! `proc/cpuinfo`). Reads never fail: a missing, unreadable, empty or non-UTF-8 file is `None`.
//! When recording, `Root` remembers every file it read (with the bytes it got), every symlink
//! and every directory it listed; [`Root::write_capture`] then rebuilds exactly that into a new
//! tree, symlinks as symlinks, so the tree reads back as the same inventory (a fixture).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Files larger than this are not read whole (sysfs attributes are one page; cpuinfo of a
/// large machine and the SMBIOS table are the largest things read).
const MAX_FILE: u64 = 4 << 20;

#[derive(Debug, Default)]
struct Record {
    /// Files read, with the bytes read.
    files: BTreeMap<PathBuf, Vec<u8>>,
    /// Paths whose existence, link or listing mattered.
    paths: BTreeSet<PathBuf>,
}

/// The machine's files under a root path.
#[derive(Debug)]
pub struct Root {
    root: PathBuf,
    record: Option<Mutex<Record>>,
}

/// Why a capture could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the capture at {}", path.display())]
pub struct CaptureError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl Root {
    pub fn new(root: &Path) -> Root {
        Root {
            root: root.to_path_buf(),
            record: None,
        }
    }

    /// A root that remembers what it reads, for [`Root::write_capture`].
    pub fn recording(root: &Path) -> Root {
        Root {
            root: root.to_path_buf(),
            record: Some(Mutex::new(Record::default())),
        }
    }

    /// Whether this is the running machine (`/`), where live-only sources (LLDP) make sense.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    fn note_path(&self, rel: &Path) {
        if let Some(r) = &self.record {
            lock(r).paths.insert(rel.to_path_buf());
        }
    }

    /// Up to `max` bytes of a file.
    pub fn bytes_max(&self, rel: impl AsRef<Path>, max: u64) -> Option<Vec<u8>> {
        let rel = rel.as_ref();
        let f = fs::File::open(self.root.join(rel)).ok()?;
        // Sysfs attributes fit in one page: one read, then the read that sees the end.
        let mut buf = Vec::with_capacity(4096.min(max as usize + 1));
        f.take(max).read_to_end(&mut buf).ok()?;
        if let Some(r) = &self.record {
            lock(r).files.insert(rel.to_path_buf(), buf.clone());
        }
        Some(buf)
    }

    /// A whole (small) file.
    pub fn bytes(&self, rel: impl AsRef<Path>) -> Option<Vec<u8>> {
        self.bytes_max(rel, MAX_FILE)
    }

    /// A text file, trimmed of whitespace and NULs; `None` when missing, empty or not UTF-8.
    pub fn text(&self, rel: impl AsRef<Path>) -> Option<String> {
        let bytes = self.bytes(rel)?;
        let s = String::from_utf8(bytes).ok()?;
        clean(&s)
    }

    /// A whole text file as it is (not trimmed); `None` when missing or not UTF-8.
    pub fn raw_text(&self, rel: impl AsRef<Path>) -> Option<String> {
        String::from_utf8(self.bytes(rel)?).ok()
    }

    /// A decimal number; `None` when missing, negative, too large or not a number.
    pub fn u64(&self, rel: impl AsRef<Path>) -> Option<u64> {
        self.text(rel)?.parse().ok()
    }

    /// A decimal number that may be negative (`-1` often means "unknown").
    pub fn i64(&self, rel: impl AsRef<Path>) -> Option<i64> {
        self.text(rel)?.parse().ok()
    }

    /// A `0x`-prefixed hexadecimal number (PCI ids and classes).
    pub fn hex(&self, rel: impl AsRef<Path>) -> Option<u64> {
        let t = self.text(rel)?;
        u64::from_str_radix(t.strip_prefix("0x").unwrap_or(&t), 16).ok()
    }

    /// `"1"` is true, `"0"` false, anything else unknown.
    pub fn flag(&self, rel: impl AsRef<Path>) -> Option<bool> {
        match self.text(rel)?.as_str() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        }
    }

    pub fn exists(&self, rel: impl AsRef<Path>) -> bool {
        let rel = rel.as_ref();
        let found = fs::symlink_metadata(self.root.join(rel)).is_ok();
        if found {
            self.note_path(rel);
        }
        found
    }

    /// The last component of a symlink's target (`driver` -> `e1000e`).
    pub fn link_name(&self, rel: impl AsRef<Path>) -> Option<String> {
        let rel = rel.as_ref();
        let target = fs::read_link(self.root.join(rel)).ok()?;
        self.note_path(rel);
        target.file_name()?.to_str().map(str::to_string)
    }

    /// The names in a directory, sorted; names that are not UTF-8 are left out.
    pub fn list(&self, rel: impl AsRef<Path>) -> Vec<String> {
        let rel = rel.as_ref();
        let Ok(entries) = fs::read_dir(self.root.join(rel)) else {
            return Vec::new();
        };
        self.note_path(rel);
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// The real location of `rel` (symlinks followed), relative to the root: the sysfs device
    /// path of `sys/block/sda` is `sys/devices/pci0000:00/.../block/sda`. Follows links
    /// within the root only.
    pub fn resolve(&self, rel: impl AsRef<Path>) -> Option<PathBuf> {
        let rel = rel.as_ref();
        let resolved = resolve_in(&self.root, rel, 0)?;
        self.note_path(rel);
        Some(resolved)
    }

    /// Rebuilds what was read into `dir` (which must not exist or be empty).
    pub fn write_capture(&self, dir: &Path) -> Result<usize, CaptureError> {
        let Some(record) = &self.record else {
            return Ok(0);
        };
        let record = lock(record);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaptureError { path, source }
        };
        fs::create_dir_all(dir).map_err(err(dir))?;
        let mut count = 0;
        for rel in record.paths.iter().chain(record.files.keys()) {
            mirror(&self.root, dir, rel, 0).map_err(err(&dir.join(rel)))?;
        }
        for (rel, bytes) in &record.files {
            let real = resolve_in(&self.root, rel, 0).unwrap_or_else(|| rel.clone());
            let dst = dir.join(&real);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(err(parent))?;
            }
            if fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            fs::write(&dst, bytes).map_err(err(&dst))?;
            count += 1;
        }
        Ok(count)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Trims whitespace and NULs; `None` when nothing is left.
pub fn clean(s: &str) -> Option<String> {
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_string())
}

/// Joins `rel` onto `base` lexically (`..` pops), never leaving the root.
fn push_lexical(base: &mut PathBuf, rel: &Path) {
    for c in rel.components() {
        match c {
            Component::ParentDir => {
                base.pop();
            }
            Component::Normal(n) => base.push(n),
            Component::RootDir => base.clear(),
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// Follows symlinks component by component inside `root`; the result is relative to `root`.
fn resolve_in(root: &Path, rel: &Path, depth: usize) -> Option<PathBuf> {
    if depth > 40 {
        return None;
    }
    let mut cur = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::ParentDir => {
                cur.pop();
            }
            Component::Normal(n) => {
                let next = cur.join(n);
                let meta = fs::symlink_metadata(root.join(&next)).ok()?;
                if meta.is_symlink() {
                    let target = fs::read_link(root.join(&next)).ok()?;
                    let mut joined = cur.clone();
                    push_lexical(&mut joined, &target);
                    cur = resolve_in(root, &joined, depth + 1)?;
                } else {
                    cur = next;
                }
            }
            _ => {}
        }
    }
    Some(cur)
}

/// Recreates `rel` under `dst` as it is under `src`: its directories, and every symlink on the
/// way (with the same target), followed so their targets exist too.
fn mirror(src: &Path, dst: &Path, rel: &Path, depth: usize) -> io::Result<()> {
    if depth > 40 {
        return Ok(());
    }
    let mut cur = PathBuf::new();
    let comps: Vec<&OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for (i, n) in comps.iter().enumerate() {
        let next = cur.join(n);
        let Ok(meta) = fs::symlink_metadata(src.join(&next)) else {
            return Ok(());
        };
        if meta.is_symlink() {
            let mut target = fs::read_link(src.join(&next))?;
            if target.is_absolute() {
                // Keep the capture self-contained: make the link relative to its directory.
                let up = "../".repeat(next.components().count().saturating_sub(1));
                target = PathBuf::from(format!(
                    "{up}{}",
                    target.display().to_string().trim_start_matches('/')
                ));
            }
            let link = dst.join(&next);
            if fs::symlink_metadata(&link).is_err() {
                if let Some(p) = link.parent() {
                    fs::create_dir_all(p)?;
                }
                std::os::unix::fs::symlink(&target, &link)?;
            }
            let mut joined = cur.clone();
            push_lexical(&mut joined, &target);
            mirror(src, dst, &joined, depth + 1)?;
            match resolve_in(src, &joined, 0) {
                Some(r) => cur = r,
                None => return Ok(()),
            }
        } else if meta.is_dir() {
            fs::create_dir_all(dst.join(&next))?;
            cur = next;
        } else {
            // A file: its content is written from what was read. Devices (e.g. /dev/sda) become
            // plain files holding the bytes read.
            if i + 1 != comps.len() {
                return Ok(());
            }
            cur = next;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_reads_back_the_same() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("sys/devices/pci0000:00/0000:00:02.0/block/vda")).unwrap();
        fs::write(
            src.join("sys/devices/pci0000:00/0000:00:02.0/block/vda/size"),
            "100\n",
        )
        .unwrap();
        fs::write(
            src.join("sys/devices/pci0000:00/0000:00:02.0/block/vda/unread"),
            "x",
        )
        .unwrap();
        fs::create_dir_all(src.join("sys/block")).unwrap();
        std::os::unix::fs::symlink(
            "../devices/pci0000:00/0000:00:02.0/block/vda",
            src.join("sys/block/vda"),
        )
        .unwrap();
        let r = Root::recording(&src);
        assert_eq!(r.u64("sys/block/vda/size"), Some(100));
        assert_eq!(
            r.resolve("sys/block/vda").unwrap(),
            Path::new("sys/devices/pci0000:00/0000:00:02.0/block/vda")
        );
        assert_eq!(r.list("sys/block"), ["vda"]);
        let dst = t.path().join("dst");
        assert_eq!(r.write_capture(&dst).unwrap(), 1);
        assert!(
            fs::symlink_metadata(dst.join("sys/block/vda"))
                .unwrap()
                .is_symlink()
        );
        let back = Root::new(&dst);
        assert_eq!(back.u64("sys/block/vda/size"), Some(100));
        assert!(!back.exists("sys/block/vda/unread"));
    }

    #[test]
    fn symlink_loops_end() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("sys/block")).unwrap();
        std::os::unix::fs::symlink("vdb", t.path().join("sys/block/vda")).unwrap();
        std::os::unix::fs::symlink("vda", t.path().join("sys/block/vdb")).unwrap();
        let r = Root::recording(t.path());
        assert_eq!(r.resolve("sys/block/vda"), None);
        assert_eq!(r.text("sys/block/vda/size"), None);
        let t2 = tempfile::tempdir().unwrap();
        r.write_capture(&t2.path().join("c")).unwrap();
        let inv = crate::inventory::Inventory::collect(t.path(), &Default::default());
        assert!(inv.disks.is_empty());
    }

    #[test]
    fn odd_values_are_none() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        fs::write(p.join("empty"), "").unwrap();
        fs::write(p.join("spaces"), " \n\0").unwrap();
        fs::write(p.join("latin1"), b"caf\xe9\n").unwrap();
        fs::write(p.join("huge"), "123456789012345678901234567890\n").unwrap();
        fs::write(p.join("neg"), "-1\n").unwrap();
        let r = Root::new(p);
        for f in ["empty", "spaces", "latin1", "missing"] {
            assert_eq!(r.text(f), None, "{f}");
        }
        assert_eq!(r.u64("huge"), None);
        assert_eq!(r.u64("neg"), None);
        assert_eq!(r.i64("neg"), Some(-1));
        assert_eq!(r.flag("neg"), None);
    }
}
