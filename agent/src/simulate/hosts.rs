//! The hosts directory for a load test: one metal3 `BareMetalHost` per simulated machine
//! (`sim-NNNNN`, its boot MAC, the image, its first generated disk as the root device hint,
//! a userData Secret reference) and that `v1` `Secret` (a small `#cloud-config`), several
//! hosts per file. Rendering is pure; [`write_hosts`] writes each file then renames it into
//! place, so a coordinator watching the directory never reads half a file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::hardware;

/// The image every generated host is to be provisioned with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub url: String,
    pub checksum: String,
    /// md5, sha256, sha512 or auto.
    pub checksum_type: String,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct HostSet {
    pub first_index: u32,
    pub count: u32,
    pub prefix: [u8; 3],
    pub namespace: Option<String>,
    /// `None`: hosts without an image (they are inspected, cleaned and stay available).
    pub image: Option<Image>,
    pub per_file: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("cannot create {dir}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {file}")]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The host name of machine `index`.
pub fn host_name(index: u32) -> String {
    format!("sim-{index:05}")
}

/// The documents of machine `index`: its `BareMetalHost`, `---`, its userData `Secret`.
pub fn render_host(set: &HostSet, index: u32) -> String {
    let name = host_name(index);
    let mac = hardware::mac_of(set.prefix, index);
    let ns = set
        .namespace
        .as_deref()
        .map(|n| format!("  namespace: {n}\n"))
        .unwrap_or_default();
    let mut doc = format!(
        "apiVersion: metal3.io/v1alpha1\n\
         kind: BareMetalHost\n\
         metadata:\n  name: {name}\n{ns}\
         spec:\n  online: true\n  bootMACAddress: \"{mac}\"\n"
    );
    if let Some(image) = &set.image {
        let _ = write!(
            doc,
            "  image:\n    url: {}\n    checksum: {}\n    checksumType: {}\n    format: raw\n",
            yaml_string(&image.url),
            yaml_string(&image.checksum),
            image.checksum_type
        );
    }
    let _ = write!(
        doc,
        "  rootDeviceHints:\n    deviceName: {}\n  userData:\n    name: {name}-user-data\n",
        hardware::first_disk(index)
    );
    let _ = write!(
        doc,
        "---\n\
         apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  name: {name}-user-data\n{ns}\
         type: Opaque\n\
         stringData:\n  userData: |\n    #cloud-config\n    hostname: {name}\n    \
         fqdn: {name}.sim.example\n"
    );
    doc
}

/// A YAML scalar for free text: double-quoted, with `"` and `\` escaped.
fn yaml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The files to write: (file name, contents), `per_file` hosts each, named after their first
/// host.
pub fn render(set: &HostSet) -> Vec<(String, String)> {
    let per_file = set.per_file.max(1);
    let end = set.first_index + set.count;
    let mut files = Vec::new();
    let mut at = set.first_index;
    while at < end {
        let last = (at + per_file).min(end);
        let docs: Vec<String> = (at..last).map(|i| render_host(set, i)).collect();
        let body = format!(
            "# {} simulated hosts ({}..{}), written by slipway-agent simulate-hosts.\n{}",
            last - at,
            host_name(at),
            host_name(last - 1),
            docs.join("---\n")
        );
        files.push((format!("{}.yaml", host_name(at)), body));
        at = last;
    }
    files
}

/// Writes the files of [`render`] into `dir` (created if missing), each through a hidden
/// temporary file and a rename. Returns the number of files.
pub fn write_hosts(dir: &Path, set: &HostSet) -> Result<usize, HostsError> {
    std::fs::create_dir_all(dir).map_err(|source| HostsError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let files = render(set);
    for (name, text) in &files {
        let tmp = dir.join(format!(".{name}.tmp"));
        let file = dir.join(name);
        std::fs::write(&tmp, text).map_err(|source| HostsError::Write {
            file: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &file).map_err(|source| HostsError::Write { file, source })?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(count: u32, per_file: u32) -> HostSet {
        HostSet {
            first_index: 98,
            count,
            prefix: [0x52, 0x54, 0x00],
            namespace: None,
            image: Some(Image {
                url: "http://10.0.0.1:8080/images/sim.raw".into(),
                checksum: "ab".repeat(32),
                checksum_type: "sha256".into(),
            }),
            per_file,
        }
    }

    #[test]
    fn a_host_is_a_bare_metal_host_and_its_user_data_secret() {
        let text = render_host(&set(1, 1), 98);
        let disk = hardware::first_disk(98);
        let expected = format!(
            r#"apiVersion: metal3.io/v1alpha1
kind: BareMetalHost
metadata:
  name: sim-00098
spec:
  online: true
  bootMACAddress: "52:54:00:00:00:62"
  image:
    url: "http://10.0.0.1:8080/images/sim.raw"
    checksum: "{sum}"
    checksumType: sha256
    format: raw
  rootDeviceHints:
    deviceName: {disk}
  userData:
    name: sim-00098-user-data
---
apiVersion: v1
kind: Secret
metadata:
  name: sim-00098-user-data
type: Opaque
stringData:
  userData: |
    #cloud-config
    hostname: sim-00098
    fqdn: sim-00098.sim.example
"#,
            sum = "ab".repeat(32)
        );
        assert_eq!(text, expected);
        // Every document is YAML of the shape the coordinator reads.
        for doc in text.split("---\n") {
            let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).unwrap();
            assert!(
                v["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("sim-00098")
            );
        }
    }

    #[test]
    fn namespaces_and_hosts_without_images() {
        let mut s = set(1, 1);
        s.namespace = Some("lab".into());
        s.image = None;
        let text = render_host(&s, 5);
        assert_eq!(text.matches("  namespace: lab\n").count(), 2, "{text}");
        assert!(!text.contains("image:"), "{text}");
        let host: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text.split("---\n").next().unwrap()).unwrap();
        assert_eq!(host["spec"]["bootMACAddress"], "52:54:00:00:00:05");
        assert_eq!(
            host["spec"]["rootDeviceHints"]["deviceName"],
            hardware::first_disk(5).as_str()
        );
    }

    #[test]
    fn hosts_are_grouped_into_files_named_after_their_first_host() {
        let files = render(&set(250, 100));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["sim-00098.yaml", "sim-00198.yaml", "sim-00298.yaml"]
        );
        let hosts_in = |t: &str| t.matches("kind: BareMetalHost").count();
        assert_eq!(
            files.iter().map(|(_, t)| hosts_in(t)).collect::<Vec<_>>(),
            [100, 100, 50]
        );
        assert_eq!(
            files
                .iter()
                .map(|(_, t)| t.matches("kind: Secret").count())
                .sum::<usize>(),
            250
        );
        assert!(files[2].1.contains("name: sim-00347\n") && !files[2].1.contains("sim-00348"));
        // 10,000 hosts at the default 100 per file: 100 files.
        let mut big = set(10_000, 100);
        big.first_index = 0;
        assert_eq!(render(&big).len(), 100);
    }

    #[test]
    fn the_files_are_written_into_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("hosts");
        assert_eq!(write_hosts(&out, &set(7, 3)).unwrap(), 3);
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["sim-00098.yaml", "sim-00101.yaml", "sim-00104.yaml"]
        );
        let text = std::fs::read_to_string(out.join("sim-00104.yaml")).unwrap();
        assert_eq!(text, render(&set(7, 3))[2].1);
    }
}
