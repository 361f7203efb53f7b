//! The one place xtask spawns processes: errors carry the full command line and its stderr.

#![allow(clippy::disallowed_methods)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// A command line, shown in errors.
pub fn line(program: &str, args: &[&OsStr]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs to completion with inherited stdout/stderr; fails with the command line.
pub fn run(program: &str, args: &[&str], dir: Option<&Path>) -> anyhow::Result<()> {
    run_env(program, args, dir, &[])
}

/// [`run`] with extra environment variables for the program.
pub fn run_env(
    program: &str,
    args: &[&str],
    dir: Option<&Path>,
    env: &[(&str, &OsStr)],
) -> anyhow::Result<()> {
    let mut c = Command::new(program);
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c
        .status()
        .with_context(|| format!("cannot run {}", line(program, &to_os(args))))?;
    if !status.success() {
        bail!("`{}` failed with {status}", line(program, &to_os(args)));
    }
    Ok(())
}

/// Runs and returns stdout; on failure the error includes stderr.
pub fn output(program: &str, args: &[&str], env: &[(&str, &OsStr)]) -> anyhow::Result<String> {
    let mut c = Command::new(program);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .with_context(|| format!("cannot run {}", line(program, &to_os(args))))?;
    if !out.status.success() {
        bail!(
            "`{}` failed with {}: {}",
            line(program, &to_os(args)),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts a background process with stderr (and stdout) to `log`.
pub fn spawn(
    program: &Path,
    args: &[&OsStr],
    env: &[(&str, &OsStr)],
    log: &Path,
) -> anyhow::Result<Child> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut c = Command::new(program);
    c.args(args).stdout(Stdio::null()).stderr(file);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().with_context(|| {
        format!(
            "cannot start {}",
            line(&program.display().to_string(), args)
        )
    })
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn to_os<'a>(args: &'a [&'a str]) -> Vec<&'a OsStr> {
    args.iter().map(OsStr::new).collect()
}
