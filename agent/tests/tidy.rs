//! Architecture check: the agent's run-time layers call only downwards.
//!
//! `cli` parses flags and dispatches; `init` is PID 1 and starts `run`; `simulate` (the load
//! generator) drives many sessions at once; `run` is the enrol-and-serve loop; `session` talks to the coordinator and drives an executor; `commands`
//! runs commands; `console` prints milestones. When a lower layer reaches up (as `init` once
//! called `cli`, and `session` and `commands` called `init` for milestones), the layers can
//! no longer be read, tested or reused alone: the load generator could not drive the session
//! without dragging in PID 1.

use std::fs;
use std::path::{Path, PathBuf};

/// From the top down. A module may name (`crate::X`) only modules of a later row.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["init", "simulate"],
    &["run"],
    &["session"],
    &["commands"],
    &["console"],
];

/// The layer of a module, by name.
fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&module))
}

/// The source files of a module: `src/X.rs`, and everything under `src/X/`.
fn files_of(src: &Path, module: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        out.push(file);
    }
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// The top-level modules a source text names through `crate::`: `crate::x::...`, and each
/// item of `crate::{x, y::z, ...}` (over several lines too), with the line of each. Comment
/// lines are skipped.
fn crate_modules(text: &str) -> Vec<(usize, String)> {
    let code: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = code[from..].find("crate::") {
        let start = from + found + "crate::".len();
        from = start;
        let rest = &code[start..];
        let Some(group) = rest.strip_prefix('{') else {
            let name: String = rest.chars().take_while(|c| ident(*c)).collect();
            if !name.is_empty() {
                out.push((line_of(start), name));
            }
            continue;
        };
        // The group's top-level names: the first word of each comma-separated item.
        let mut depth = 0usize;
        let mut name = String::new();
        let mut expecting = true;
        for (i, c) in group.char_indices() {
            if depth == 0 && expecting && ident(c) {
                name.push(c);
                continue;
            }
            if !name.is_empty() {
                out.push((line_of(start + 1 + i), std::mem::take(&mut name)));
                expecting = false;
            }
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => expecting = true,
                _ => {}
            }
        }
    }
    out
}

#[test]
fn the_scanner_sees_every_form_of_import() {
    let text = "use crate::run::RunArgs;\n\
                use crate::{console, session::{self, End},tls};\n\
                // crate::cli in a comment does not count\n\
                let x = crate::init::wanted() && crate::commands::chain(&e);\n\
                use crate::{\n    disk,\n    image::{Algo, Format},\n};\n";
    let found = crate_modules(text);
    let names: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        names,
        [
            "run", "console", "session", "tls", "init", "commands", "disk", "image"
        ]
    );
    let lines: Vec<usize> = found.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [1, 2, 2, 2, 4, 4, 6, 7]);
}

#[test]
fn run_time_layers_call_only_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offences = Vec::new();
    let mut checked = 0;
    for (level, row) in LAYERS.iter().enumerate() {
        for module in *row {
            let files = files_of(&src, module);
            assert!(
                !files.is_empty(),
                "no source for the layer {module}: update LAYERS in {}",
                file!()
            );
            for path in files {
                let text = fs::read_to_string(&path).unwrap();
                checked += 1;
                for (line, used) in crate_modules(&text) {
                    if used == *module {
                        continue;
                    }
                    if let Some(l) = layer(&used)
                        && l <= level
                    {
                        offences.push(format!(
                            "{}:{line}: {module} uses crate::{used}, which is not below it",
                            path.display()
                        ));
                    }
                }
            }
        }
    }
    assert!(checked >= LAYERS.len());
    assert!(
        offences.is_empty(),
        "layers: {LAYERS:?} (each may use only later rows)\n{}",
        offences.join("\n")
    );
}
