//! Virtual-media ISOs as capability URLs.
//!
//! An ISO carries a host's boot token, so it is made only when a boot of the host's ramdisk
//! is meant (`slipway boot iso HOST`, later a BMC driver's virtual-media boot), never by
//! host name: its URL is `/boot/iso/CAPABILITY.iso` with 32 random bytes in it, valid until
//! the token inside expires. The template is patched once, on a blocking thread, written to
//! `STATE/iso/` and served from there like a file (Range included); a host has at most one
//! ISO, and a new one for the host replaces it. An unknown or expired capability costs a
//! hash and a map lookup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use slipway_reconcile::host::HostKey;

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error(
        "no ISO template at {} ({source}); build it with cargo xtask ramdisk", path.display()
    )]
    Template {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot patch the ISO template {}: {message}", path.display())]
    Patch { path: PathBuf, message: String },
    #[error("cannot write the ISO {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the ISO's URL: {0}")]
    Random(String),
}

/// A made ISO.
#[derive(Clone, Debug)]
struct Made {
    host: HostKey,
    path: PathBuf,
    expires_at: Timestamp,
    /// The fingerprint of the token inside: the same token gets the same ISO again.
    token: String,
    capability: String,
}

#[derive(Default)]
struct Inner {
    /// By the capability's SHA-256 (the capability itself is not kept as a key).
    by_capability: HashMap<String, Made>,
    by_host: HashMap<HostKey, String>,
}

pub struct Isos {
    dir: PathBuf,
    template: PathBuf,
    inner: Mutex<Inner>,
}

impl Isos {
    /// ISOs under `dir` (emptied: capabilities do not survive a restart), made from
    /// `template`.
    pub fn new(dir: PathBuf, template: PathBuf) -> std::io::Result<Arc<Isos>> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot empty {}: {e}", dir.display()),
                ));
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
        })?;
        Ok(Arc::new(Isos {
            dir,
            template,
            inner: Mutex::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ISO for `host` with kernel arguments `args` (which carry the token whose
    /// fingerprint is `token`), valid until `expires_at`: its capability. The same token
    /// gets the ISO already made; another replaces the host's ISO.
    pub async fn make(
        self: &Arc<Self>,
        host: &HostKey,
        token: &str,
        args: String,
        expires_at: Timestamp,
    ) -> Result<String, IsoError> {
        if let Some(made) = self.host_iso(host)
            && made.token == token
        {
            return Ok(made.capability);
        }
        let capability = crate::tokens::generate()
            .map_err(|e| IsoError::Random(e.to_string()))?
            .expose()
            .to_string();
        let id = crate::pki::sha256_hex(capability.as_bytes());
        let path = self.dir.join(format!("{id}.iso"));
        let me = Arc::clone(self);
        let out = path.clone();
        tokio::task::spawn_blocking(move || me.write(&out, &args))
            .await
            .map_err(|e| IsoError::Patch {
                path: self.template.clone(),
                message: e.to_string(),
            })??;
        let made = Made {
            host: host.clone(),
            path,
            expires_at,
            token: token.to_string(),
            capability: capability.clone(),
        };
        let old = {
            let mut inner = self.lock();
            let old = inner.by_host.insert(host.clone(), id.clone());
            inner.by_capability.insert(id, made);
            old.and_then(|o| inner.by_capability.remove(&o))
        };
        if let Some(old) = old {
            let _ = std::fs::remove_file(&old.path);
        }
        Ok(capability)
    }

    fn host_iso(&self, host: &HostKey) -> Option<Made> {
        let inner = self.lock();
        let id = inner.by_host.get(host)?;
        inner.by_capability.get(id).cloned()
    }

    /// Patches the template into `out` (through a temporary file, renamed when complete).
    fn write(&self, out: &Path, args: &str) -> Result<(), IsoError> {
        let template = std::fs::read(&self.template).map_err(|source| IsoError::Template {
            path: self.template.clone(),
            source,
        })?;
        let iso =
            crate::boot::patch_iso(&template, args.trim()).map_err(|message| IsoError::Patch {
                path: self.template.clone(),
                message,
            })?;
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, &iso)
            .and_then(|()| std::fs::rename(&tmp, out))
            .map_err(|source| {
                let _ = std::fs::remove_file(&tmp);
                IsoError::Write {
                    path: out.to_path_buf(),
                    source,
                }
            })
    }

    /// The file behind a capability, while it is valid. Expired ISOs are removed on the way.
    pub fn find(&self, capability: &str, now: Timestamp) -> Option<PathBuf> {
        self.sweep(now);
        let id = crate::pki::sha256_hex(capability.as_bytes());
        self.lock().by_capability.get(&id).map(|m| m.path.clone())
    }

    /// Removes the host's ISO (the host went, or its token was used).
    pub fn forget(&self, host: &HostKey) {
        let made = {
            let mut inner = self.lock();
            let id = inner.by_host.remove(host);
            id.and_then(|id| inner.by_capability.remove(&id))
        };
        if let Some(m) = made {
            let _ = std::fs::remove_file(&m.path);
        }
    }

    /// Removes every expired ISO.
    pub fn sweep(&self, now: Timestamp) {
        let gone: Vec<Made> = {
            let mut inner = self.lock();
            let expired: Vec<String> = inner
                .by_capability
                .iter()
                .filter(|(_, m)| m.expires_at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            let mut gone = Vec::new();
            for id in expired {
                if let Some(m) = inner.by_capability.remove(&id) {
                    if inner.by_host.get(&m.host) == Some(&id) {
                        inner.by_host.remove(&m.host);
                    }
                    gone.push(m);
                }
            }
            gone
        };
        for m in gone {
            let _ = std::fs::remove_file(&m.path);
        }
    }

    /// How many ISOs are kept (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().by_capability.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(dir: &Path) -> PathBuf {
        let path = dir.join("slipway.iso");
        let mut t = vec![0u8; 4096];
        let p = crate::boot::ISO_PLACEHOLDER;
        t[1000..1000 + p.len()].copy_from_slice(p);
        std::fs::write(&path, &t).unwrap();
        path
    }

    #[tokio::test]
    async fn an_iso_is_made_once_per_token_replaced_per_host_and_gone_when_expired() {
        let dir = tempfile::tempdir().unwrap();
        let isos = Isos::new(dir.path().join("iso"), template(dir.path())).unwrap();
        let a = HostKey::default_ns("a");
        let now = Timestamp::now();
        let later = now + jiff::SignedDuration::from_mins(10);
        let cap = isos
            .make(&a, "t1", "slipway.token=one".into(), later)
            .await
            .unwrap();
        assert_eq!(cap.len(), 43);
        let file = isos.find(&cap, now).expect("found");
        let iso = std::fs::read(&file).unwrap();
        assert!(
            iso.windows(b"slipway.token=one".len())
                .any(|w| w == b"slipway.token=one")
        );
        // The same token: the same ISO.
        let again = isos
            .make(&a, "t1", "slipway.token=one".into(), later)
            .await
            .unwrap();
        assert_eq!(again, cap);
        // A new token replaces it: the old URL is gone, and its file.
        let next = isos
            .make(&a, "t2", "slipway.token=two".into(), later)
            .await
            .unwrap();
        assert_ne!(next, cap);
        assert!(isos.find(&cap, now).is_none());
        assert!(!file.exists());
        assert_eq!(isos.len(), 1);
        // Guessing is useless, and an expired one is removed.
        assert!(isos.find("a-host-name", now).is_none());
        assert!(isos.find(&next, later).is_none());
        assert!(isos.is_empty());
    }

    #[tokio::test]
    async fn a_missing_template_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let isos = Isos::new(dir.path().join("iso"), dir.path().join("nope.iso")).unwrap();
        let e = isos
            .make(&HostKey::default_ns("a"), "t", "x".into(), Timestamp::MAX)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nope.iso"), "{e}");
        assert!(e.to_string().contains("cargo xtask ramdisk"), "{e}");
    }
}
