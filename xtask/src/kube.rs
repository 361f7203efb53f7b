//! `cargo xtask kube-apiserver`: a real kube-apiserver (v1.20.2, built once from Debian's
//! `kubernetes` source package by `xtask/kube/build-apiserver.sh`) for the tests of Kubernetes
//! mode, kept in a cache directory outside the repository and reused.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{cmd, deps};

/// What the tests need to run the API server: its store (etcd) and openssl for its
/// certificates.
pub const RUN_PACKAGES: &[&str] = &["etcd-server", "openssl"];
/// What the build needs beyond those: Debian's Go, its reflect2 (the vendored one breaks with
/// Go >= 1.18), rsync for the Kubernetes tree's own build scripts.
pub const BUILD_PACKAGES: &[&str] = &["golang-go", "golang-github-modern-go-reflect2-dev", "rsync"];

/// Builds the API server into `$SLIPWAY_CACHE/kube-apiserver-1.20.2` unless it is there
/// (about 17 minutes on 2 cores the first time), installing missing packages as root; returns
/// the binary's path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let cache = slipway_tests::kube::apiserver_cache_dir();
    let bin = cache.join("kube-apiserver");
    deps::ensure_packages(RUN_PACKAGES)?;
    if !bin.is_file() {
        deps::ensure_packages(BUILD_PACKAGES)?;
    }
    let script = root.join("xtask/kube/build-apiserver.sh");
    let (Some(script), Some(cache_arg)) = (script.to_str(), cache.to_str()) else {
        bail!("paths must be UTF-8: {}", cache.display());
    };
    cmd::run("bash", &[script, cache_arg], Some(root))?;
    if !bin.is_file() {
        bail!("{script} finished but {} is missing", bin.display());
    }
    if !cmd::have("kubectl") {
        // Debian's own (kubernetes-client 1.20) is too old for `kubectl patch --subresource`.
        eprintln!("xtask: warning: the Kubernetes tests need kubectl (1.24 or newer) on PATH");
    }
    Ok(bin)
}
