//! `cargo xtask ramdisk`: the Slipway ramdisk from `ramdisk/recipe.toml`.
//!
//! 1. The static agent: `cargo build --release --target x86_64-unknown-linux-musl`; the build
//!    fails if the binary has an ELF interpreter (i.e. is not static).
//! 2. The kernel: `apt-get download` of the recipe's kernel package (cached), `dpkg -x`,
//!    `depmod -b` (the .deb ships no modules.dep).
//! 3. The modules: the recipe's list closed over modules.dep and modules.softdep, copied with
//!    their paths; `depmod -b` again on the subset.
//! 4. The initramfs: a newc cpio written here (`/init`, `/dev/console`, the modules), zstd.
//! 5. The ISO template for virtual media (grub-mkrescue), with a placeholder the coordinator
//!    fills with each host's kernel arguments.
//! 6. `manifest.json` with sizes; the build fails beyond the recipe's size budget.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::json;

use crate::cmd;

/// The placeholder in the ISO's grub.cfg, padded with `#` to [`ISO_ARGS_LEN`] bytes.
pub const ISO_PLACEHOLDER: &str = "@@SLIPWAY_KERNEL_ARGS@@";
/// Bytes reserved for per-host kernel arguments in the ISO.
pub const ISO_ARGS_LEN: usize = 1024;

/// The recipe, as read from `ramdisk/recipe.toml`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub kernel_package: String,
    pub zstd_level: i32,
    pub max_total_mib: u64,
    pub console: String,
    pub modules: BTreeMap<String, Vec<String>>,
}

impl Recipe {
    pub fn load(root: &Path) -> anyhow::Result<Recipe> {
        let path = root.join("ramdisk/recipe.toml");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("bad recipe {}", path.display()))
    }

    pub fn module_names(&self) -> Vec<String> {
        let mut all: Vec<String> = self.modules.values().flatten().map(|m| norm(m)).collect();
        all.sort();
        all.dedup();
        all
    }
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Paths of the outputs.
pub struct Outputs {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub iso: PathBuf,
    pub manifest: PathBuf,
}

impl Outputs {
    pub fn new(root: &Path) -> Outputs {
        let dir = root.join("target/ramdisk/out");
        Outputs {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs"),
            iso: dir.join("slipway.iso"),
            manifest: dir.join("manifest.json"),
            dir,
        }
    }
}

/// Debian packages the ramdisk build needs.
pub const TOOLS: &[(&str, &str)] = &[
    ("depmod", "kmod"),
    ("dpkg-deb", "dpkg"),
    ("musl-gcc", "musl-tools"),
    ("grub-mkrescue", "grub-common"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
];
/// grub-mkrescue needs both platforms' GRUB files for a hybrid ISO.
pub const PACKAGES: &[&str] = &["grub-pc-bin", "grub-efi-amd64-bin"];

pub fn build(root: &Path) -> anyhow::Result<Outputs> {
    let recipe = Recipe::load(root)?;
    let out = Outputs::new(root);
    let work = root.join("target/ramdisk");
    fs::create_dir_all(&out.dir)?;

    // 1. The agent.
    cmd::run(
        "rustup",
        &["target", "add", "x86_64-unknown-linux-musl"],
        None,
    )?;
    eprintln!("xtask ramdisk: building the static agent");
    cmd::run(
        "cargo",
        &[
            "build",
            "--quiet",
            "--release",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "slipway-agent",
            "--bin",
            "slipway-agent",
        ],
        Some(root),
    )?;
    let agent = root.join("target/x86_64-unknown-linux-musl/release/slipway-agent");
    let agent_bytes =
        fs::read(&agent).with_context(|| format!("cannot read {}", agent.display()))?;
    match slipway_tests::elf_interpreter(&agent_bytes) {
        Ok(None) => {}
        Ok(Some(interp)) => bail!(
            "{} is dynamically linked (interpreter {interp}); the ramdisk needs a static binary",
            agent.display()
        ),
        Err(e) => bail!("{} is not a readable ELF file: {e}", agent.display()),
    }

    // 2. The kernel.
    let (kver, kroot) = kernel(&recipe, &work)?;
    let kmods = kroot.join("lib/modules").join(&kver);

    // 3. Modules: the recipe, closed over dependencies.
    let dep = fs::read_to_string(kmods.join("modules.dep"))?;
    let softdep = fs::read_to_string(kmods.join("modules.softdep")).unwrap_or_default();
    let index = DepIndex::parse(&dep, &softdep);
    let builtin: BTreeSet<String> = fs::read_to_string(kmods.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|l| norm(l.rsplit('/').next().unwrap_or(l).trim_end_matches(".ko")))
        .collect();
    let mut wanted = Vec::new();
    for m in recipe.module_names() {
        if index.paths.contains_key(&m) {
            wanted.push(m);
        } else if !builtin.contains(&m) {
            bail!(
                "module {m} from ramdisk/recipe.toml is not in kernel {kver} (neither a module nor built in)"
            );
        }
    }
    let closure = index.closure(&wanted);
    let stage = work.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let smods = stage.join("lib/modules").join(&kver);
    fs::create_dir_all(&smods)?;
    for m in &closure {
        let rel = &index.paths[m];
        let to = smods.join(rel);
        fs::create_dir_all(to.parent().unwrap_or(&smods))?;
        fs::copy(kmods.join(rel), &to).with_context(|| format!("cannot copy module {rel}"))?;
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if kmods.join(f).exists() {
            fs::copy(kmods.join(f), smods.join(f))?;
        }
    }
    cmd::run("depmod", &["-b", &stage.display().to_string(), &kver], None)?;

    // 4. The initramfs.
    let mut files: Vec<CpioEntry> = vec![
        CpioEntry::dir("dev"),
        CpioEntry::char_dev("dev/console", 5, 1, 0o600),
        CpioEntry::dir("proc"),
        CpioEntry::dir("sys"),
        CpioEntry::dir("run"),
        CpioEntry::dir("tmp"),
        CpioEntry::dir("etc"),
        CpioEntry::file("init", agent_bytes.clone(), 0o755),
    ];
    let manifest_modules: Vec<String> = closure.iter().cloned().collect();
    let info = json!({ "kernel": kver, "agent_version": env!("CARGO_PKG_VERSION"), "modules": manifest_modules });
    files.push(CpioEntry::file(
        "etc/slipway-ramdisk.json",
        serde_json::to_vec_pretty(&info)?,
        0o644,
    ));
    add_tree(&stage, Path::new("lib"), &mut files)?;
    let cpio = cpio_newc(&files);
    let compressed = zstd::encode_all(&cpio[..], recipe.zstd_level).context("zstd")?;
    fs::write(&out.initramfs, &compressed)?;
    fs::copy(
        kroot.join("boot").join(format!("vmlinuz-{kver}")),
        &out.kernel,
    )?;

    // 5. The ISO template.
    iso(&recipe, &out, &work)?;

    // 6. Manifest and budget.
    let kernel_len = fs::metadata(&out.kernel)?.len();
    let initramfs_len = compressed.len() as u64;
    let modules_len: u64 = closure
        .iter()
        .map(|m| {
            fs::metadata(smods.join(&index.paths[m]))
                .map(|x| x.len())
                .unwrap_or(0)
        })
        .sum();
    let total = kernel_len + initramfs_len;
    let manifest = json!({
        "kernel_version": kver,
        "kernel_bytes": kernel_len,
        "initramfs_bytes": initramfs_len,
        "initramfs_uncompressed_bytes": cpio.len(),
        "total_bytes": total,
        "budget_bytes": recipe.max_total_mib << 20,
        "agent_bytes": agent_bytes.len(),
        "agent_static": true,
        "modules": closure.len(),
        "modules_bytes": modules_len,
        "iso_bytes": fs::metadata(&out.iso)?.len(),
        "console": recipe.console,
        "iso_placeholder": ISO_PLACEHOLDER,
        "iso_args_len": ISO_ARGS_LEN,
    });
    fs::write(
        &out.manifest,
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    println!(
        "ramdisk: kernel {kver} {:.1} MiB + initramfs {:.1} MiB = {:.1} MiB (budget {} MiB); agent {:.1} MiB static; {} modules ({:.1} MiB raw); ISO {:.1} MiB\n  {}",
        mib(kernel_len),
        mib(initramfs_len),
        mib(total),
        recipe.max_total_mib,
        mib(agent_bytes.len() as u64),
        closure.len(),
        mib(modules_len),
        mib(fs::metadata(&out.iso)?.len()),
        out.dir.display()
    );
    if total > recipe.max_total_mib << 20 {
        bail!(
            "kernel + initramfs is {:.1} MiB, over the recipe's budget of {} MiB",
            mib(total),
            recipe.max_total_mib
        );
    }
    Ok(out)
}

fn mib(n: u64) -> f64 {
    n as f64 / (1 << 20) as f64
}

/// Downloads (cached) and unpacks the kernel package; returns (version, unpacked root).
fn kernel(recipe: &Recipe, work: &Path) -> anyhow::Result<(String, PathBuf)> {
    let cache = work.join("cache");
    fs::create_dir_all(&cache)?;
    let deps = cmd::output("apt-cache", &["depends", &recipe.kernel_package], &[])?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::trim)
        .map(str::to_string)
        .with_context(|| {
            format!(
                "apt-cache depends {} names no linux-image package (run apt-get update?)",
                recipe.kernel_package
            )
        })?;
    let deb = match find_deb(&cache, &pkg)? {
        Some(d) => d,
        None => {
            eprintln!("xtask ramdisk: downloading {pkg}");
            cmd::run("apt-get", &["download", "-q", &pkg], Some(&cache))?;
            find_deb(&cache, &pkg)?.with_context(|| {
                format!("apt-get download {pkg} left no .deb in {}", cache.display())
            })?
        }
    };
    let kroot = work.join("kernel").join(&pkg);
    if !kroot.join("boot").exists() {
        fs::create_dir_all(&kroot)?;
        cmd::run(
            "dpkg-deb",
            &[
                "-x",
                &deb.display().to_string(),
                &kroot.display().to_string(),
            ],
            None,
        )?;
    }
    let kver = fs::read_dir(kroot.join("lib/modules"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules")?;
    if !kroot
        .join("lib/modules")
        .join(&kver)
        .join("modules.dep")
        .exists()
    {
        cmd::run("depmod", &["-b", &kroot.display().to_string(), &kver], None)?;
    }
    Ok((kver, kroot))
}

fn find_deb(dir: &Path, pkg: &str) -> anyhow::Result<Option<PathBuf>> {
    Ok(fs::read_dir(dir)?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().is_some_and(|n| {
            n.to_string_lossy().starts_with(&format!("{pkg}_"))
                && n.to_string_lossy().ends_with(".deb")
        })
    }))
}

fn iso(recipe: &Recipe, out: &Outputs, work: &Path) -> anyhow::Result<()> {
    let tree = work.join("iso");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    fs::create_dir_all(tree.join("boot/grub"))?;
    fs::copy(&out.kernel, tree.join("vmlinuz"))?;
    fs::copy(&out.initramfs, tree.join("initramfs"))?;
    fs::write(tree.join("boot/grub/grub.cfg"), grub_cfg(&recipe.console))?;
    cmd::run(
        "grub-mkrescue",
        &[
            "-o",
            &out.iso.display().to_string(),
            &tree.display().to_string(),
            "--",
            "-volid",
            "SLIPWAY",
        ],
        None,
    )?;
    let iso = fs::read(&out.iso)?;
    let n = iso
        .windows(ISO_PLACEHOLDER.len())
        .filter(|w| *w == ISO_PLACEHOLDER.as_bytes())
        .count();
    if n == 0 {
        bail!(
            "the ISO does not contain the kernel-arguments placeholder; grub.cfg was not stored as is"
        );
    }
    Ok(())
}

/// GRUB configuration of the ISO: serial and screen, one entry, per-host arguments at the
/// placeholder.
pub fn grub_cfg(console: &str) -> String {
    let mut placeholder = ISO_PLACEHOLDER.to_string();
    while placeholder.len() < ISO_ARGS_LEN {
        placeholder.push('#');
    }
    format!(
        "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\nset timeout=1\nset default=0\nmenuentry \"Slipway ramdisk\" {{\n  linux /vmlinuz {console} {placeholder}\n  initrd /initramfs\n}}\n"
    )
}

fn add_tree(base: &Path, rel: &Path, out: &mut Vec<CpioEntry>) -> anyhow::Result<()> {
    let dir = base.join(rel);
    out.push(CpioEntry::dir(&rel.display().to_string()));
    let mut entries: Vec<_> = fs::read_dir(&dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            add_tree(base, &r, out)?;
        } else {
            out.push(CpioEntry::file(
                &r.display().to_string(),
                fs::read(e.path())?,
                0o644,
            ));
        }
    }
    Ok(())
}

/// modules.dep as module name -> (path, deps), plus softdep "pre:" modules.
pub struct DepIndex {
    pub paths: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
    pre: BTreeMap<String, Vec<String>>,
}

impl DepIndex {
    pub fn parse(dep: &str, softdep: &str) -> DepIndex {
        let name = |p: &str| {
            norm(
                p.trim()
                    .rsplit('/')
                    .next()
                    .unwrap_or(p)
                    .trim_end_matches(".ko"),
            )
        };
        let mut idx = DepIndex {
            paths: BTreeMap::new(),
            deps: BTreeMap::new(),
            pre: BTreeMap::new(),
        };
        for line in dep.lines() {
            if let Some((path, deps)) = line.split_once(':') {
                let n = name(path);
                idx.paths.insert(n.clone(), path.trim().to_string());
                idx.deps
                    .insert(n, deps.split_whitespace().map(name).collect());
            }
        }
        for line in softdep.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("softdep") {
                continue;
            }
            let Some(m) = w.next() else { continue };
            let mut in_pre = false;
            for word in w {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    x if in_pre => idx.pre.entry(norm(m)).or_default().push(norm(x)),
                    _ => {}
                }
            }
        }
        idx
    }

    /// `wanted` plus everything they need (hard and soft "pre" dependencies).
    pub fn closure(&self, wanted: &[String]) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = wanted.to_vec();
        while let Some(m) = stack.pop() {
            if !self.paths.contains_key(&m) || !seen.insert(m.clone()) {
                continue;
            }
            stack.extend(self.deps.get(&m).into_iter().flatten().cloned());
            stack.extend(self.pre.get(&m).into_iter().flatten().cloned());
        }
        seen
    }
}

/// One member of a cpio archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpioEntry {
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
    pub rdev: (u32, u32),
}

impl CpioEntry {
    pub fn dir(path: &str) -> CpioEntry {
        CpioEntry {
            path: path.into(),
            mode: 0o040755,
            data: Vec::new(),
            rdev: (0, 0),
        }
    }
    pub fn file(path: &str, data: Vec<u8>, perm: u32) -> CpioEntry {
        CpioEntry {
            path: path.into(),
            mode: 0o100000 | perm,
            data,
            rdev: (0, 0),
        }
    }
    pub fn char_dev(path: &str, major: u32, minor: u32, perm: u32) -> CpioEntry {
        CpioEntry {
            path: path.into(),
            mode: 0o020000 | perm,
            data: Vec::new(),
            rdev: (major, minor),
        }
    }
}

/// The "newc" cpio format the kernel unpacks as its initramfs.
pub fn cpio_newc(entries: &[CpioEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let push = |out: &mut Vec<u8>,
                path: &str,
                mode: u32,
                data: &[u8],
                rdev: (u32, u32),
                ino: u32| {
        let name_len = path.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            mtime = 0,
            size = data.len(),
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name_len,
            check = 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(path.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    for e in entries {
        push(&mut out, &e.path, e.mode, &e.data, e.rdev, ino);
        ino += 1;
    }
    push(&mut out, "TRAILER!!!", 0, &[], (0, 0), 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let a = cpio_newc(&[
            CpioEntry::file("init", b"abc".to_vec(), 0o755),
            CpioEntry::char_dev("dev/console", 5, 1, 0o600),
        ]);
        assert_eq!(&a[..6], b"070701");
        // mode of the first entry, at offset 14
        assert_eq!(&a[14..22], b"000081ed");
        // name right after the 110-byte header, NUL terminated, data 4-aligned
        assert_eq!(&a[110..115], b"init\0");
        assert_eq!(&a[116..119], b"abc");
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("dev/console"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0\0") || text.contains("TRAILER!!!"));
        // The device numbers of /dev/console: rdevmajor 5, rdevminor 1.
        let at = text.find("dev/console").unwrap() - 110;
        assert_eq!(&a[at + 78..at + 86], b"00000005");
        assert_eq!(&a[at + 86..at + 94], b"00000001");
    }

    #[test]
    fn dependency_closure() {
        let dep = "kernel/a.ko: kernel/b.ko kernel/c-d.ko\nkernel/b.ko: kernel/c-d.ko\nkernel/c-d.ko:\nkernel/e.ko:\nkernel/f.ko:\n";
        let idx = DepIndex::parse(dep, "softdep e pre: f\n");
        let c: Vec<String> = idx.closure(&["a".into(), "e".into()]).into_iter().collect();
        assert_eq!(c, ["a", "b", "c_d", "e", "f"]);
    }

    #[test]
    fn grub_cfg_reserves_room_for_arguments() {
        let cfg = grub_cfg("console=ttyS0");
        let line = cfg.lines().find(|l| l.contains(ISO_PLACEHOLDER)).unwrap();
        let start = line.find(ISO_PLACEHOLDER).unwrap();
        assert_eq!(line.len() - start, ISO_ARGS_LEN);
    }
}
