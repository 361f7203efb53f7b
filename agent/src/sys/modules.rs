//! Kernel modules for the devices present, as udev's coldplug would load them: every
//! `modalias` under /sys/devices is matched against `modules.alias`, and matching modules are
//! loaded with their dependencies (`modules.dep`) and soft dependencies (`modules.softdep`),
//! in rounds until no new module loads (a bus driver makes new devices appear).
//!
//! The index is pure ([`ModuleIndex`]); loading (`finit_module`) is the edge.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, warn};

/// modules.dep / modules.alias / modules.softdep of one kernel.
#[derive(Clone, Debug, Default)]
pub struct ModuleIndex {
    /// module name -> (path relative to /lib/modules/KVER, dependency names)
    modules: HashMap<String, (String, Vec<String>)>,
    /// (pattern, module)
    aliases: Vec<(String, String)>,
    /// module -> modules to load before it
    pre: HashMap<String, Vec<String>>,
}

/// `virtio-net` and `virtio_net` name the same module.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

impl ModuleIndex {
    pub fn parse(dep: &str, alias: &str, softdep: &str) -> ModuleIndex {
        let mut idx = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(name_of).collect();
            idx.modules
                .insert(name_of(path), (path.trim().to_string(), deps));
        }
        for line in alias.lines() {
            let mut w = line.split_whitespace();
            if let (Some("alias"), Some(pattern), Some(module)) = (w.next(), w.next(), w.next()) {
                idx.aliases.push((pattern.to_string(), normalize(module)));
            }
        }
        for line in softdep.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("softdep") {
                continue;
            }
            let Some(module) = w.next() else { continue };
            let mut pre = Vec::new();
            let mut in_pre = false;
            for word in w {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    m if in_pre => pre.push(normalize(m)),
                    _ => {}
                }
            }
            idx.pre.entry(normalize(module)).or_default().extend(pre);
        }
        idx
    }

    /// Reads the index of the kernel whose modules are in `dir` (`/lib/modules/KVER`).
    pub fn load(dir: &Path) -> std::io::Result<ModuleIndex> {
        let read = |n: &str| fs::read_to_string(dir.join(n));
        Ok(ModuleIndex::parse(
            &read("modules.dep")?,
            &read("modules.alias").unwrap_or_default(),
            &read("modules.softdep").unwrap_or_default(),
        ))
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    pub fn contains(&self, module: &str) -> bool {
        self.modules.contains_key(&normalize(module))
    }

    /// Modules whose alias pattern matches a device's modalias, that this ramdisk carries.
    pub fn matching(&self, modalias: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .aliases
            .iter()
            .filter(|(p, m)| {
                self.modules.contains_key(m) && glob(p.as_bytes(), modalias.as_bytes())
            })
            .map(|(_, m)| m.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// `module` and everything it needs, dependencies first.
    pub fn load_order(&self, module: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        self.visit(&normalize(module), &mut out, &mut seen);
        out
    }

    fn visit(&self, m: &str, out: &mut Vec<String>, seen: &mut BTreeSet<String>) {
        if !seen.insert(m.to_string()) {
            return;
        }
        for p in self.pre.get(m).into_iter().flatten() {
            if self.modules.contains_key(p) {
                self.visit(p, out, seen);
            }
        }
        if let Some((_, deps)) = self.modules.get(m) {
            for d in deps {
                self.visit(d, out, seen);
            }
            out.push(m.to_string());
        }
    }

    pub fn path(&self, module: &str) -> Option<&str> {
        self.modules.get(module).map(|(p, _)| p.as_str())
    }
}

/// fnmatch(3) without flags: `*`, `?` and `[...]` (with `!` or `^` negation and ranges).
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(&pattern[p..], text[t]) {
                        if matched {
                            p += next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == b'[' {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

/// Matches one byte against a `[...]` class at the start of `pat`: (matched, class length).
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < pat.len() {
        if pat[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < pat.len() && pat[i + 1] == b'-' && pat[i + 2] != b']' {
            if pat[i] <= c && c <= pat[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if pat[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// Every distinct `modalias` under `sys/devices` of `root`.
pub fn modaliases(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.join("sys/devices")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && e.file_name() == "modalias"
                && let Ok(s) = fs::read_to_string(e.path())
            {
                let s = s.trim();
                if !s.is_empty() {
                    out.insert(s.to_string());
                }
            }
        }
    }
    out
}

/// Loads the modules the present devices need, plus `always`, plus for each `(a, b)` in
/// `companions` module `b` once `a` has loaded (a device interface no modalias asks for).
/// Returns the modules loaded, in order.
pub fn coldplug(modules_dir: &Path, always: &[String], companions: &[(&str, &str)]) -> Vec<String> {
    let index = match ModuleIndex::load(modules_dir) {
        Ok(i) => i,
        Err(e) => {
            warn!(
                "no kernel modules index in {}: {e}; loading nothing",
                modules_dir.display()
            );
            return Vec::new();
        }
    };
    let mut loaded: BTreeSet<String> = BTreeSet::new();
    let mut order = Vec::new();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut wanted: Vec<String> = always.iter().map(|m| normalize(m)).collect();
    for round in 0..10 {
        for alias in modaliases(Path::new("/")) {
            wanted.extend(index.matching(&alias));
        }
        let mut new = 0;
        for m in std::mem::take(&mut wanted) {
            for dep in index.load_order(&m) {
                if loaded.contains(&dep) || failed.contains(&dep) {
                    continue;
                }
                let Some(rel) = index.path(&dep) else {
                    continue;
                };
                match insert(&modules_dir.join(rel)) {
                    Ok(()) => {
                        debug!("loaded {dep}");
                        wanted.extend(
                            companions
                                .iter()
                                .filter(|(a, _)| normalize(a) == dep)
                                .map(|(_, b)| normalize(b)),
                        );
                        loaded.insert(dep.clone());
                        order.push(dep);
                        new += 1;
                    }
                    Err(e) => {
                        warn!("cannot load module {dep}: {e}");
                        failed.insert(dep);
                    }
                }
            }
        }
        if new == 0 && round > 0 {
            break;
        }
        // Let drivers probe; new devices (and modaliases) appear.
        std::thread::sleep(Duration::from_millis(if new > 0 { 200 } else { 50 }));
    }
    order
}

fn insert(path: &PathBuf) -> std::io::Result<()> {
    let file = fs::File::open(path)?;
    match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_like_fnmatch() {
        let m = |p: &str, t: &str| glob(p.as_bytes(), t.as_bytes());
        assert!(m(
            "pci:v00008086d0000100Esv*sd*bc*sc*i*",
            "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"
        ));
        assert!(!m(
            "pci:v00008086d0000100Fsv*sd*bc*sc*i*",
            "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"
        ));
        assert!(m("virtio:d00000001v*", "virtio:d00000001v00001AF4"));
        assert!(m("scsi:t-0x0[07]*", "scsi:t-0x00"));
        assert!(m("scsi:t-0x0[07]*", "scsi:t-0x07"));
        assert!(!m("scsi:t-0x0[07]*", "scsi:t-0x05"));
        assert!(m("a[!b]c", "axc") && !m("a[!b]c", "abc"));
        assert!(m("a[0-9]", "a5") && !m("a[0-9]", "ax"));
        assert!(m("*", "") && m("a*b*c", "aXXbYYc") && !m("a*b*c", "aXXbYY"));
        assert!(m("a?c", "abc") && !m("a?c", "ac"));
    }

    #[test]
    fn index_matches_and_orders_dependencies() {
        let dep = "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
                   kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
                   kernel/net/core/failover.ko:\n\
                   kernel/drivers/scsi/sd_mod.ko: kernel/lib/crc-t10dif.ko\n\
                   kernel/lib/crc-t10dif.ko:\n\
                   kernel/crypto/crct10dif_generic.ko:\n";
        let alias = "alias virtio:d00000001v* virtio_net\nalias scsi:t-0x00* sd_mod\nalias pci:v*d*sv*sd*bc01sc06i01* ahci\n";
        let soft = "softdep crc-t10dif pre: crct10dif_generic\n";
        let idx = ModuleIndex::parse(dep, alias, soft);
        assert_eq!(idx.len(), 6);
        assert_eq!(idx.matching("virtio:d00000001v00001AF4"), ["virtio_net"]);
        assert!(
            idx.matching("pci:v00008086d00002922sv*sd*bc01sc06i01")
                .is_empty(),
            "ahci is not in this ramdisk"
        );
        assert_eq!(
            idx.load_order("virtio_net"),
            ["failover", "net_failover", "virtio_net"]
        );
        assert_eq!(
            idx.load_order("sd_mod"),
            ["crct10dif_generic", "crc_t10dif", "sd_mod"]
        );
        assert_eq!(idx.load_order("nope"), Vec::<String>::new());
    }
}
