//! Files mode: `BareMetalHost` (and `v1 Secret`) documents in the YAML files of a directory.
//!
//! The directory is polled (stat of each file; changed files are re-read), so editors that
//! write a new file and rename it, configuration tools, and network filesystems all work the
//! same. Files: `*.yaml`, `*.yml`, `*.json`, not hidden, not in subdirectories (like
//! `kubectl apply -f DIR`).
//!
//! Bad input loses nothing: a document that no longer parses keeps its last good version (and
//! the problem is reported, naming the file, the document, the host and the field); a file
//! that cannot be read at all keeps all its hosts. Only a document that is removed (or a file
//! deleted) removes hosts.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use slipway_reconcile::host::{API_VERSION, BareMetalHost, HostKey, KIND};
use tokio::sync::mpsc;

use super::{Problem, Secret, SecretKey, SecretSource, SourceEvent};

/// A host as declared, with where it was declared (borrowed from the source's memory).
#[derive(Clone, Debug, PartialEq)]
pub struct SourcedHost<'a> {
    pub host: &'a BareMetalHost,
    pub path: &'a Path,
    /// 1-based document number in the file.
    pub document: usize,
}

/// Everything the directory declares now, borrowed from the source (internal to this source:
/// the engine gets the differences, see [`Differ`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot<'a> {
    pub hosts: BTreeMap<HostKey, SourcedHost<'a>>,
    /// Hosts declared by more than one document: where (file, document), in file order.
    /// None of those declarations is in `hosts`.
    pub conflicts: BTreeMap<HostKey, Vec<(&'a Path, usize)>>,
    pub secrets: BTreeMap<SecretKey, &'a Secret>,
    pub problems: Vec<Problem>,
}

/// One document of a file, as last parsed.
#[derive(Clone, Debug, PartialEq)]
enum Doc {
    Host(BareMetalHost),
    Secret(Secret),
}

#[derive(Clone, Debug, Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    /// Documents that parsed, by 1-based position.
    good: Vec<(usize, Doc)>,
    problems: Vec<Problem>,
}

/// The poller's memory of the directory.
#[derive(Debug)]
pub struct FilesSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    dir_problem: Option<Problem>,
}

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> FilesSource {
        FilesSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            dir_problem: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads what changed. Returns true when the snapshot may differ from the last one.
    pub fn scan(&mut self) -> bool {
        let listing = match list_dir(&self.dir) {
            Ok(l) => l,
            Err(e) => {
                // Keep every host: a directory that vanished for a moment (remount, rename)
                // must not delete the fleet.
                let problem = Problem {
                    path: self.dir.clone(),
                    document: 0,
                    host: None,
                    warning: false,
                    message: format!(
                        "cannot read the hosts directory ({e}); keeping the hosts last read from \
                         it"
                    ),
                };
                let changed = self.dir_problem.as_ref() != Some(&problem);
                self.dir_problem = Some(problem);
                return changed;
            }
        };
        let mut changed = self.dir_problem.take().is_some();
        let before: Vec<PathBuf> = self.files.keys().cloned().collect();
        for path in before {
            if !listing.contains_key(&path) {
                self.files.remove(&path);
                changed = true;
            }
        }
        for (path, entry) in listing {
            let state = self.files.entry(path.clone()).or_default();
            let stamp = match entry {
                Ok(stamp) => stamp,
                Err(why) => {
                    // Keep what the file declared; say why it cannot be read now.
                    let problem = keep_problem(&path, &state.good, &why);
                    if state.stamp.is_some() || state.problems != [problem.clone()] {
                        state.stamp = None;
                        state.problems = vec![problem];
                        changed = true;
                    }
                    continue;
                }
            };
            if state.stamp == Some(stamp) {
                continue;
            }
            changed = true;
            state.stamp = Some(stamp);
            match read_checked(&path) {
                Ok(text) if text.trim().is_empty() && !state.good.is_empty() => {
                    // An editor that truncates before it writes leaves this for a moment.
                    state.stamp = None; // look again next scan
                    state.problems = vec![keep_problem(
                        &path,
                        &state.good,
                        "the file is empty (an editor saving it?)",
                    )];
                }
                Ok(text) => {
                    let (good, problems) = parse_file(&path, &text, &state.good);
                    state.good = good;
                    state.problems = problems;
                }
                Err(why) => {
                    state.stamp = None; // try again next scan
                    state.problems = vec![keep_problem(&path, &state.good, &why)];
                }
            }
        }
        changed
    }

    pub fn snapshot(&self) -> Snapshot<'_> {
        let mut snap = Snapshot::default();
        snap.problems.extend(self.dir_problem.clone());
        for (path, state) in &self.files {
            snap.problems.extend(state.problems.iter().cloned());
            for (document, doc) in &state.good {
                match doc {
                    Doc::Host(host) => {
                        let key = HostKey::of(&host.metadata);
                        if let Some(places) = snap.conflicts.get_mut(&key) {
                            places.push((path, *document));
                            continue;
                        }
                        if let Some(first) = snap.hosts.get(&key) {
                            if first.host == host {
                                // The same declaration twice (or a link to the file): nothing
                                // is ambiguous.
                                snap.problems.push(Problem {
                                    path: path.clone(),
                                    document: *document,
                                    host: Some(key.name.clone()),
                                    warning: true,
                                    message: format!(
                                        "host {key} is already declared in {} (document {}), \
                                         identically; this copy changes nothing: remove one of \
                                         them",
                                        first.path.display(),
                                        first.document
                                    ),
                                });
                                continue;
                            }
                            let place = (first.path, first.document);
                            snap.hosts.remove(&key);
                            snap.conflicts.insert(key, vec![place, (path, *document)]);
                            continue;
                        }
                        snap.hosts.insert(
                            key,
                            SourcedHost {
                                host,
                                path,
                                document: *document,
                            },
                        );
                    }
                    Doc::Secret(secret) => {
                        snap.secrets.insert(secret.key(), secret);
                    }
                }
            }
        }
        // A name declared twice is decided by neither file's order: both are reported, and
        // the host keeps what it had until one goes.
        for (key, places) in &snap.conflicts {
            let message = conflict_message(key, places);
            for (path, document) in places {
                snap.problems.push(Problem {
                    path: path.to_path_buf(),
                    document: *document,
                    host: Some(key.name.clone()),
                    warning: false,
                    message: message.clone(),
                });
            }
        }
        snap
    }
}

/// Why a host declared by several documents is not changed by any of them.
pub fn conflict_message(key: &HostKey, places: &[(&Path, usize)]) -> String {
    let list: Vec<String> = places
        .iter()
        .map(|(p, d)| format!("{} (document {d})", p.display()))
        .collect();
    format!(
        "host {key} is declared {} times: in {}; remove all but one (until then the host keeps \
         its last good declaration and takes no new action)",
        places.len(),
        list.join(" and ")
    )
}

/// Turns successive snapshots into the events the engine takes: what changed since the last
/// snapshot, host by host and Secret by Secret. It remembers a digest of each host it sent,
/// not the host (10,000 copies of every declaration cost tens of MiB).
#[derive(Debug, Default)]
pub struct Differ {
    hosts: BTreeMap<HostKey, [u8; 32]>,
    secrets: BTreeMap<SecretKey, Secret>,
    problems: Vec<Problem>,
    /// Hosts missing from the last snapshot: removed if the next one lacks them too.
    missing: std::collections::BTreeSet<HostKey>,
    /// Hosts declared more than once, with the message last sent.
    conflicts: BTreeMap<HostKey, String>,
}

/// SHA-256 of a declaration and its origin.
fn digest(host: &BareMetalHost, origin: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(host).unwrap_or_default());
    h.update([0]);
    h.update(origin.as_bytes());
    h.finalize().into()
}

impl Differ {
    /// Whether a host missing from the last snapshot waits for the next scan to confirm it.
    pub fn pending(&self) -> bool {
        !self.missing.is_empty()
    }

    /// The Secrets as of the last diff.
    pub fn secrets(&self) -> &BTreeMap<SecretKey, Secret> {
        &self.secrets
    }

    /// The events that take the engine from the previous snapshot to `snap`. Secrets come
    /// first, so a host that needs a new Secret finds it declared.
    pub fn diff(&mut self, snap: &Snapshot<'_>) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        for (key, secret) in &snap.secrets {
            let secret = *secret;
            if self.secrets.get(key) != Some(secret) {
                // A change of contents alone is sent too: the hosts using the Secret plan
                // again (one that failed on contents that did not parse retries at once).
                self.secrets.insert(key.clone(), secret.clone());
                out.push(SourceEvent::Secret {
                    key: key.clone(),
                    keys: Some(secret.key_names()),
                });
            }
        }
        let gone: Vec<SecretKey> = self
            .secrets
            .keys()
            .filter(|k| !snap.secrets.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.secrets.remove(&key);
            out.push(SourceEvent::Secret { key, keys: None });
        }
        for (key, places) in &snap.conflicts {
            let message = conflict_message(key, places);
            if self.conflicts.get(key) != Some(&message) {
                self.conflicts.insert(key.clone(), message.clone());
                // When it is resolved, the remaining declaration is sent again.
                self.hosts.remove(key);
                out.push(SourceEvent::Conflict {
                    key: key.clone(),
                    field: "metadata.name",
                    why: Some(message),
                });
            }
        }
        let resolved: Vec<HostKey> = self
            .conflicts
            .keys()
            .filter(|k| !snap.conflicts.contains_key(*k))
            .cloned()
            .collect();
        for key in resolved {
            self.conflicts.remove(&key);
            out.push(SourceEvent::Conflict {
                key,
                field: "metadata.name",
                why: None,
            });
        }
        for (key, sourced) in &snap.hosts {
            let origin = sourced.path.display().to_string();
            let d = digest(sourced.host, &origin);
            if self.hosts.get(key) != Some(&d) {
                self.hosts.insert(key.clone(), d);
                // A document's status is ignored, as the API server ignores one on create.
                let mut host = sourced.host.clone();
                host.status = None;
                out.push(SourceEvent::Declared {
                    key: key.clone(),
                    host: Box::new(host),
                    origin,
                });
            }
        }
        // A host is removed only when two scans in a row miss it: a file being rewritten
        // by an editor that truncates first, or a mount being swapped, must not delete it.
        let gone: Vec<HostKey> = self
            .hosts
            .keys()
            .filter(|k| !snap.hosts.contains_key(*k))
            .cloned()
            .collect();
        let mut missing = std::collections::BTreeSet::new();
        for key in gone {
            if self.missing.contains(&key) {
                self.hosts.remove(&key);
                out.push(SourceEvent::Undeclared { key });
            } else {
                missing.insert(key);
            }
        }
        self.missing = missing;
        if snap.problems != self.problems {
            self.problems = snap.problems.clone();
            out.push(SourceEvent::Problems(snap.problems.clone()));
        }
        out
    }
}

/// The Secrets of the hosts directory, as last read: the files source's [`SecretSource`].
#[derive(Debug, Default)]
pub struct FilesSecrets(RwLock<BTreeMap<SecretKey, Secret>>);

impl SecretSource for FilesSecrets {
    fn get(&self, key: &SecretKey) -> Option<Secret> {
        let m = self.0.read().unwrap_or_else(|p| p.into_inner());
        m.get(key).cloned()
    }
}

/// Starts files mode's source: reads the directory once (all of it, then
/// [`SourceEvent::Synced`]), then polls it every `poll` and sends what changed. Returns the
/// Secrets' contents for the engine to read at act time.
pub async fn spawn(
    dir: PathBuf,
    poll: Duration,
    tx: mpsc::Sender<SourceEvent>,
) -> Arc<FilesSecrets> {
    let secrets = Arc::new(FilesSecrets::default());
    let shared = secrets.clone();
    tokio::spawn(async move {
        let mut source = FilesSource::new(&dir);
        let mut differ = Differ::default();
        let mut first = true;
        loop {
            let scanned = tokio::task::spawn_blocking(move || {
                let changed = source.scan();
                let events = if changed || differ.pending() {
                    differ.diff(&source.snapshot())
                } else {
                    Vec::new()
                };
                (source, differ, events)
            })
            .await;
            let Ok((back, back_differ, events)) = scanned else {
                tracing::error!("the hosts directory watcher failed; restart slipway serve");
                return;
            };
            source = back;
            differ = back_differ;
            if events
                .iter()
                .any(|e| matches!(e, SourceEvent::Secret { .. }))
            {
                let mut m = shared.0.write().unwrap_or_else(|p| p.into_inner());
                *m = differ.secrets().clone();
            }
            for event in events {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            if first {
                first = false;
                if tx.send(SourceEvent::Synced).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(poll).await;
        }
    });
    secrets
}

/// A file's modification time and length, or why it cannot be used.
type Listed = Result<(SystemTime, u64), String>;

fn list_dir(dir: &Path) -> io::Result<BTreeMap<PathBuf, Listed>> {
    let mut out = BTreeMap::new();
    // Files may be symlinks (ConfigMap mounts are), but only to files inside the directory.
    let root = fs::canonicalize(dir)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.')
            || !(name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
        {
            continue;
        }
        let path = entry.path();
        let listed = match fs::metadata(&path) {
            Err(e) => Err(format!(
                "cannot stat the file ({e}; a symlink whose target is gone?)"
            )),
            Ok(meta) if meta.is_dir() => continue,
            Ok(meta) if !meta.is_file() => Err("not a regular file".to_string()),
            Ok(meta) => match fs::canonicalize(&path) {
                Ok(target) if !target.starts_with(&root) => Err(format!(
                    "it is a symlink to {}, outside the hosts directory {}: refused (copy the \
                     file in, or link to a file inside the directory)",
                    target.display(),
                    root.display()
                )),
                Err(e) => Err(format!("cannot resolve the file ({e})")),
                Ok(_) => Ok((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                )),
            },
        };
        out.insert(path, listed);
    }
    Ok(out)
}

/// The largest hosts file read.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// The deepest flow nesting (`[` / `{`) accepted in a hosts file.
pub const MAX_NESTING: usize = 64;
/// The deepest indentation (columns) accepted in a hosts file.
pub const MAX_INDENT: usize = 256;

/// A problem that keeps the file's hosts as last read.
fn keep_problem(path: &Path, good: &[(usize, Doc)], why: &str) -> Problem {
    let hosts = good
        .iter()
        .filter(|(_, d)| matches!(d, Doc::Host(_)))
        .count();
    Problem {
        path: path.to_path_buf(),
        document: 0,
        host: None,
        warning: false,
        message: format!(
            "{why}; keeping the {hosts} host(s) it declared as last read (delete the file to \
             remove them)"
        ),
    }
}

/// Reads a hosts file within the size and nesting limits, which are checked before any
/// parsing (a YAML parser is quadratic in the nesting of some inputs).
fn read_checked(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = fs::File::open(path).map_err(|e| format!("cannot read the file ({e})"))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file ({e})"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "the file is larger than {} MiB, the limit for a hosts file: split it",
            MAX_FILE_BYTES >> 20
        ));
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    nesting(&text)?;
    Ok(text)
}

/// Refuses flow nesting deeper than [`MAX_NESTING`] and indentation deeper than
/// [`MAX_INDENT`], naming the line. Quoted scalars and comments are skipped.
fn nesting(text: &str) -> Result<(), String> {
    let mut depth = 0usize;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if indent > MAX_INDENT {
            return Err(format!(
                "line {}: indented {indent} columns, beyond the limit of {MAX_INDENT} for a \
                 hosts file; refused before parsing",
                n + 1
            ));
        }
        let mut quote: Option<char> = None;
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(format!(
                            "line {}: nested deeper than {MAX_NESTING} levels of [ and {{, the \
                             limit for a hosts file; refused before parsing",
                            n + 1
                        ));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Parses every document of a file. `previous` is what the file's documents were last time;
/// a document that fails now keeps its previous version (matched by host name), and when the
/// file cannot even be split into documents, all previous documents are kept.
fn parse_file(
    path: &Path,
    text: &str,
    previous: &[(usize, Doc)],
) -> (Vec<(usize, Doc)>, Vec<Problem>) {
    let mut good = Vec::new();
    let mut problems = Vec::new();
    let mut kept_names = Vec::new();
    let mut syntax_broken = false;
    let problem = |document: usize, host: Option<String>, warning: bool, message: String| Problem {
        path: path.to_path_buf(),
        document,
        host,
        warning,
        message,
    };

    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = match serde_yaml_ng::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                problems.push(problem(n, None, false, format!("not valid YAML: {e}")));
                syntax_broken = true;
                break;
            }
        };
        if value.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        match kind {
            KIND => {
                if api_version != API_VERSION {
                    problems.push(problem(
                        n,
                        name.clone(),
                        false,
                        format!("apiVersion is {api_version:?}; Slipway reads BareMetalHost {API_VERSION}"),
                    ));
                    kept_names.extend(name);
                    continue;
                }
                match parse_host(value) {
                    Ok(host) => good.push((n, Doc::Host(host))),
                    Err(message) => {
                        problems.push(problem(n, name.clone(), false, message));
                        kept_names.extend(name);
                    }
                }
            }
            "Secret" if api_version == "v1" => match parse_secret(&value) {
                Ok(secret) => good.push((n, Doc::Secret(secret))),
                Err(message) => problems.push(problem(n, name, false, message)),
            },
            "" => problems.push(problem(
                n,
                name,
                false,
                "has no kind; every document needs apiVersion and kind (e.g. apiVersion: \
                 metal3.io/v1alpha1, kind: BareMetalHost)"
                    .into(),
            )),
            other => problems.push(problem(
                n,
                name,
                true,
                format!("kind {other} is not used by Slipway; ignored"),
            )),
        }
    }

    // Keep the last good version of what failed now.
    for (n, doc) in previous {
        let keep = match doc {
            Doc::Host(h) => {
                let name = &h.metadata.name;
                let redefined = good
                    .iter()
                    .any(|(_, d)| matches!(d, Doc::Host(g) if &g.metadata.name == name));
                !redefined && (syntax_broken || kept_names.contains(name))
            }
            Doc::Secret(s) => {
                syntax_broken
                    && !good
                        .iter()
                        .any(|(_, d)| matches!(d, Doc::Secret(g) if g.name == s.name))
            }
        };
        if keep {
            good.push((*n, doc.clone()));
        }
    }
    if !problems.is_empty() && !previous.is_empty() {
        for p in problems.iter_mut().filter(|p| !p.warning) {
            if p.host.as_ref().is_some_and(|h| {
                good.iter()
                    .any(|(_, d)| matches!(d, Doc::Host(g) if &g.metadata.name == h))
            }) || (syntax_broken && p.host.is_none())
            {
                p.message
                    .push_str("; the last good version stays in effect until this is fixed");
            }
        }
    }
    good.sort_by_key(|(n, _)| *n);
    (good, problems)
}

fn parse_host(value: serde_yaml_ng::Value) -> Result<BareMetalHost, String> {
    let host: BareMetalHost = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = plain_error(&e.into_inner().to_string());
        if path == "." || path.is_empty() {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })?;
    check_name(&host.metadata.name)?;
    Ok(host)
}

/// A serde error message in plain words, for people who write YAML rather than Rust: `invalid
/// type: string "abc", expected u64` becomes `is the text "abc" but must be a whole number (an
/// integer, 0 or more)`, an unknown variant lists the values the field takes, and an unknown
/// field says to check the spelling (and suggests the field meant). Messages it does not
/// recognise are returned as they are.
pub(crate) fn plain_error(message: &str) -> String {
    // Parsed from text, serde_yaml_ng adds where; the caller names the field instead.
    let message = match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => &message[..i],
        _ => message,
    };
    if let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        && let Some((unexpected, expected)) = rest.rsplit_once(", expected ")
    {
        return format!(
            "is {} but must be {}",
            plain_unexpected(unexpected),
            plain_expected(expected)
        );
    }
    if let Some(rest) = message.strip_prefix("unknown variant ")
        && let Some((value, expected)) = rest.split_once(", expected ")
    {
        let value = value.trim_matches('`');
        let values = plain_list(expected);
        let mut out = format!("{value:?} is not one of: {values}");
        if let Some(meant) = values.split(", ").find(|v| v.eq_ignore_ascii_case(value)) {
            out.push_str(&format!(" (did you mean {meant}? the case matters)"));
        }
        return out;
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (field, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let name = field.trim_matches('`');
        let known = plain_list(expected);
        let mut out = format!(
            "unknown field {field} (check the spelling; Slipway reads metal3.io/v1alpha1 \
             BareMetalHost fields)"
        );
        if let Some(near) = known
            .split(", ")
            .filter(|k| !k.is_empty())
            .map(|k| (edit_distance(&name.to_lowercase(), &k.to_lowercase()), k))
            .filter(|(d, _)| *d <= 2)
            .min_by_key(|(d, _)| *d)
        {
            out.push_str(&format!("; did you mean {}?", near.1));
        }
        if !known.is_empty() {
            out.push_str(&format!("; the fields here are: {known}"));
        }
        return out;
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("the required field {} is missing", rest.trim_matches('`'));
    }
    message.to_string()
}

/// serde's `Unexpected` (what was found) in plain words.
fn plain_unexpected(found: &str) -> String {
    let quoted = |s: &str| s.trim_matches('`').to_string();
    if let Some(s) = found.strip_prefix("string ") {
        format!("the text {s}")
    } else if let Some(c) = found.strip_prefix("character ") {
        format!("the text {:?}", quoted(c))
    } else if let Some(n) = found
        .strip_prefix("integer ")
        .or_else(|| found.strip_prefix("floating point "))
    {
        format!("the number {}", quoted(n))
    } else if let Some(b) = found.strip_prefix("boolean ") {
        quoted(b)
    } else {
        match found {
            "sequence" => "a list".into(),
            "map" => "a mapping (key: value pairs)".into(),
            "unit value" | "Option value" => "empty".into(),
            other => other.to_string(),
        }
    }
}

/// serde's `Expected` (what the field takes) in plain words.
fn plain_expected(expected: &str) -> String {
    match expected {
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "u64" | "u128" | "usize" => "a whole number (an integer, 0 or more)".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number (an integer)".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a string" | "a borrowed string" | "string" => "text".into(),
        "a character" | "a char" | "char" => "a single character".into(),
        "a sequence" | "sequence" | "a list" => "a list".into(),
        "a map" | "map" => "a mapping (key: value pairs)".into(),
        e if e.starts_with("struct ") => "a mapping (key: value pairs)".into(),
        e if e.starts_with("enum ") || e.starts_with("a YAML tag") => {
            "a single word (one of the values the field takes)".into()
        }
        other => other.to_string(),
    }
}

/// serde's list of names (`` `a`, `b` ``, `` `a` or `b` ``, `` one of `a`, `b` ``) as `a, b`.
fn plain_list(expected: &str) -> String {
    let expected = expected.strip_prefix("one of ").unwrap_or(expected);
    expected
        .split(['`', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "or")
        .collect::<Vec<_>>()
        .join(", ")
}

/// Levenshtein distance, for suggesting the field a misspelt name meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Kubernetes object names: a DNS-1123 subdomain.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "metadata.name {name:?} is not a valid name: use lower-case letters, digits, '-' and \
             '.', starting and ending with a letter or digit"
        ))
    }
}

fn parse_secret(value: &serde_yaml_ng::Value) -> Result<Secret, String> {
    use base64::Engine;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        metadata: Meta,
        #[serde(default)]
        data: HashMap<String, String>,
        #[serde(default)]
        string_data: HashMap<String, String>,
    }
    #[derive(Deserialize)]
    struct Meta {
        name: String,
        #[serde(default)]
        namespace: Option<String>,
    }
    let raw: Raw = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", plain_error(&e.into_inner().to_string()))
    })?;
    check_name(&raw.metadata.name)?;
    let mut data = BTreeMap::new();
    for (k, v) in raw.data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .map_err(|e| {
                format!("data.{k}: not base64 ({e}); put plain text under stringData instead")
            })?;
        data.insert(k, bytes);
    }
    for (k, v) in raw.string_data {
        data.insert(k, v.into_bytes());
    }
    Ok(Secret {
        name: raw.metadata.name,
        namespace: raw.metadata.namespace,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> HostKey {
        HostKey::default_ns(name)
    }

    const HOST_A: &str = "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: a\nspec:\n  online: true\n";
    const HOST_B: &str = "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata:\n  name: b\nspec:\n  online: false\n";

    fn write(dir: &Path, name: &str, text: &str) {
        // A new mtime is not guaranteed within the same tick; the length changes in these tests
        // or the file is new.
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_hosts_and_secrets_from_multi_document_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {username: YWRtaW4=}\nstringData: {password: pw}\n";
        write(dir.path(), "a.yaml", &format!("{HOST_A}---\n{secret}---\n"));
        write(dir.path(), "b.yml", HOST_B);
        write(dir.path(), ".hidden.yaml", "garbage: [");
        write(dir.path(), "notes.txt", "garbage: [");
        let mut src = FilesSource::new(dir.path());
        assert!(src.scan());
        let snap = src.snapshot();
        assert_eq!(snap.problems, vec![]);
        assert_eq!(
            snap.hosts
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(snap.hosts[&k("a")].host.spec.online);
        assert_eq!(snap.hosts[&k("a")].document, 1);
        assert_eq!(snap.secrets[&k("s")].data["username"], b"admin");
        assert_eq!(snap.secrets[&k("s")].data["password"], b"pw");
        assert!(!src.scan(), "nothing changed");
    }

    #[test]
    fn serde_messages_are_rewritten_in_plain_words() {
        let whole = "a whole number (an integer, 0 or more)";
        let map = "a mapping (key: value pairs)";
        for (serde, plain) in [
            (
                r#"invalid type: string "abc", expected u64"#,
                format!(r#"is the text "abc" but must be {whole}"#),
            ),
            (
                "invalid value: integer `-1`, expected u64",
                format!("is the number -1 but must be {whole}"),
            ),
            (
                "invalid type: integer `-1`, expected u64 at line 1 column 37",
                format!("is the number -1 but must be {whole}"),
            ),
            (
                "invalid type: floating point `1.5`, expected u64",
                format!("is the number 1.5 but must be {whole}"),
            ),
            (
                "invalid value: integer `300`, expected u8",
                "is the number 300 but must be a whole number from 0 to 255".into(),
            ),
            (
                "invalid value: integer `-3`, expected u32",
                "is the number -3 but must be a whole number from 0 to 4294967295".into(),
            ),
            (
                r#"invalid type: string "x", expected i32"#,
                r#"is the text "x" but must be a whole number (an integer)"#.into(),
            ),
            (
                "invalid type: floating point `1.5`, expected i64",
                "is the number 1.5 but must be a whole number (an integer)".into(),
            ),
            (
                r#"invalid type: string "x", expected f64"#,
                r#"is the text "x" but must be a number"#.into(),
            ),
            (
                "invalid type: sequence, expected u64",
                format!("is a list but must be {whole}"),
            ),
            (
                r#"invalid type: string "yes", expected a boolean"#,
                r#"is the text "yes" but must be true or false"#.into(),
            ),
            (
                "invalid type: unit value, expected a boolean",
                "is empty but must be true or false".into(),
            ),
            (
                "invalid type: sequence, expected struct RootDeviceHints",
                format!("is a list but must be {map}"),
            ),
            (
                "invalid type: boolean `true`, expected a map",
                format!("is true but must be {map}"),
            ),
            (
                "invalid type: map, expected a string",
                format!("is {map} but must be text"),
            ),
            (
                "invalid type: map, expected a sequence",
                format!("is {map} but must be a list"),
            ),
            (
                "invalid type: map, expected a YAML tag starting with '!'",
                format!("is {map} but must be a single word (one of the values the field takes)"),
            ),
            (
                "unknown variant `xyz`, expected one of `a`, `b`",
                r#""xyz" is not one of: a, b"#.into(),
            ),
            (
                "unknown variant `xyz`, expected `a` or `b`",
                r#""xyz" is not one of: a, b"#.into(),
            ),
            (
                "unknown variant `uefi`, expected one of `UEFI`, `UEFISecureBoot`, `legacy`",
                r#""uefi" is not one of: UEFI, UEFISecureBoot, legacy (did you mean UEFI? the case matters)"#.into(),
            ),
            (
                "unknown field `checksumTyp`, expected one of `url`, `checksum`, `checksumType`",
                "unknown field `checksumTyp` (check the spelling; Slipway reads \
                 metal3.io/v1alpha1 BareMetalHost fields); did you mean checksumType?; the \
                 fields here are: url, checksum, checksumType"
                    .into(),
            ),
            (
                "unknown field `zzz`",
                "unknown field `zzz` (check the spelling; Slipway reads metal3.io/v1alpha1 \
                 BareMetalHost fields)"
                    .into(),
            ),
            (
                "missing field `url`",
                "the required field url is missing".into(),
            ),
            ("something else", "something else".into()),
        ] {
            assert_eq!(plain_error(serde), plain, "{serde}");
        }
    }

    #[test]
    fn type_errors_of_a_host_read_in_plain_words() {
        let host = |spec: &str| {
            let yaml = format!(
                "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata: {{name: a}}\n\
                 spec:\n{spec}\n"
            );
            parse_host(serde_yaml_ng::from_str(&yaml).unwrap()).unwrap_err()
        };
        assert_eq!(
            host("  rootDeviceHints: {minSizeGigabytes: abc}"),
            "spec.rootDeviceHints.minSizeGigabytes: is the text \"abc\" but must be a whole \
             number (an integer, 0 or more)"
        );
        assert_eq!(
            host("  online: [true]"),
            "spec.online: is a list but must be true or false"
        );
        assert_eq!(
            host("  bmc: redfish://x"),
            "spec.bmc: is the text \"redfish://x\" but must be a mapping (key: value pairs)"
        );
        assert_eq!(
            host("  bootMode: uefi"),
            "spec.bootMode: \"uefi\" is not one of: UEFI, UEFISecureBoot, legacy (did you mean \
             UEFI? the case matters)"
        );
        let typo = host("  onlin: true");
        assert!(
            typo.starts_with("spec.onlin: unknown field `onlin` (check the spelling")
                && typo.contains("did you mean online?"),
            "{typo}"
        );
    }

    #[test]
    fn unknown_field_names_file_document_host_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let bad = "apiVersion: metal3.io/v1alpha1\nkind: BareMetalHost\nmetadata: {name: c}\nspec:\n  image:\n    url: http://x/y\n    checksumTyp: sha256\n";
        write(dir.path(), "c.yaml", &format!("{HOST_A}---\n{bad}"));
        let mut src = FilesSource::new(dir.path());
        src.scan();
        let snap = src.snapshot();
        assert_eq!(
            snap.hosts
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["a"],
            "the good document still counts"
        );
        assert_eq!(snap.problems.len(), 1);
        let text = snap.problems[0].to_string();
        assert!(
            text.contains(
                "c.yaml: document 2 (host c): spec.image.checksumTyp: unknown field `checksumTyp`"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", HOST_A);
        let mut src = FilesSource::new(dir.path());
        src.scan();
        // Field error: the host keeps its previous spec.
        write(
            dir.path(),
            "a.yaml",
            &HOST_A.replace("online: true", "online: true\n  bootMACAddres: x"),
        );
        assert!(src.scan());
        let snap = src.snapshot();
        assert!(snap.hosts[&k("a")].host.spec.online);
        assert!(
            snap.problems[0]
                .message
                .contains("unknown field `bootMACAddres`")
        );
        assert!(
            snap.problems[0]
                .message
                .contains("last good version stays in effect")
        );
        // Syntax error: the whole file keeps its hosts.
        write(
            dir.path(),
            "a.yaml",
            "apiVersion: metal3.io/v1alpha1\nkind: [BareMetalHost\n",
        );
        src.scan();
        let snap = src.snapshot();
        assert!(snap.hosts.contains_key(&k("a")));
        assert!(
            snap.problems[0].message.starts_with("not valid YAML"),
            "{}",
            snap.problems[0].message
        );
        // Fixed: problem gone, new spec in effect.
        write(
            dir.path(),
            "a.yaml",
            &HOST_A.replace("online: true", "online: false"),
        );
        src.scan();
        let snap = src.snapshot();
        assert!(snap.problems.is_empty());
        assert!(!snap.hosts[&k("a")].host.spec.online);
        // Removed file: host gone.
        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        src.scan();
        assert!(src.snapshot().hosts.is_empty());
    }

    #[test]
    fn duplicates_wrong_kinds_and_names_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "1.yaml", HOST_A);
        write(
            dir.path(),
            "2.yaml",
            &format!(
                "{HOST_A}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\nfoo: bar\n"
            ),
        );
        write(
            dir.path(),
            "3.yaml",
            &HOST_B
                .replace("name: b", "name: Bad_Name")
                .replace("v1alpha1", "v1beta1"),
        );
        write(
            dir.path(),
            "4.yaml",
            &HOST_B.replace("name: b", "name: Bad_Name"),
        );
        let mut src = FilesSource::new(dir.path());
        src.scan();
        let snap = src.snapshot();
        let texts: Vec<String> = snap.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            snap.hosts
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert!(
            texts.iter().any(|t| t
                .contains("2.yaml: document 1 (host a): host default/a is already declared in")
                && t.contains("1.yaml (document 1)")),
            "{texts:#?}"
        );
        assert!(
            texts.iter().any(|t| t
                .contains("document 2 (host x): kind ConfigMap is not used by Slipway; ignored")),
            "{texts:#?}"
        );
        assert!(
            texts.iter().any(|t| t.contains("document 3: has no kind")),
            "{texts:#?}"
        );
        assert!(
            texts.iter().any(|t| t.contains(
                "3.yaml: document 1 (host Bad_Name): apiVersion is \"metal3.io/v1beta1\""
            )),
            "{texts:#?}"
        );
        assert!(
            texts.iter().any(|t| t.contains(
                "4.yaml: document 1 (host Bad_Name): metadata.name \"Bad_Name\" is not a valid name"
            )),
            "{texts:#?}"
        );
    }

    #[test]
    fn missing_directory_keeps_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        fs::create_dir(&hosts).unwrap();
        write(&hosts, "a.yaml", HOST_A);
        let mut src = FilesSource::new(&hosts);
        src.scan();
        fs::rename(&hosts, dir.path().join("elsewhere")).unwrap();
        assert!(src.scan());
        let snap = src.snapshot();
        assert!(snap.hosts.contains_key(&k("a")));
        assert!(
            snap.problems[0]
                .message
                .contains("cannot read the hosts directory")
        );
    }

    #[test]
    fn the_differ_sends_what_changed_host_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: team}\nstringData: {userData: x}\n";
        write(dir.path(), "a.yaml", &format!("{HOST_A}---\n{secret}"));
        write(dir.path(), "b.yaml", HOST_B);
        let mut src = FilesSource::new(dir.path());
        let mut differ = Differ::default();
        src.scan();
        let first = differ.diff(&src.snapshot());
        let kinds: Vec<String> = first
            .iter()
            .map(|e| match e {
                SourceEvent::Declared { key, .. } => format!("declared {key}"),
                SourceEvent::Undeclared { key } => format!("undeclared {key}"),
                SourceEvent::Secret { key, keys } => format!("secret {key} {keys:?}"),
                SourceEvent::Problems(p) => format!("problems {}", p.len()),
                SourceEvent::Synced => "synced".into(),
                SourceEvent::Conflict { key, why, .. } => {
                    format!("conflict {key} {}", why.is_some())
                }
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "secret team/s Some({\"userData\"})",
                "declared default/a",
                "declared default/b"
            ]
        );
        assert!(differ.diff(&src.snapshot()).is_empty(), "nothing changed");
        // One host edited, one removed: two events, nothing about the rest.
        write(
            dir.path(),
            "a.yaml",
            &HOST_A.replace("online: true", "online: false"),
        );
        fs::remove_file(dir.path().join("b.yaml")).unwrap();
        src.scan();
        let events = differ.diff(&src.snapshot());
        assert_eq!(
            events.len(),
            2,
            "b is not removed on the first scan that misses it: {events:?}"
        );
        assert!(matches!(&events[0], SourceEvent::Secret { keys: None, .. }));
        assert!(differ.pending());
        let mut events = events;
        events.extend(differ.diff(&src.snapshot()));
        assert!(
            matches!(&events[1], SourceEvent::Declared { key, host, .. } if key.name == "a" && !host.spec.online)
        );
        assert!(matches!(&events[2], SourceEvent::Undeclared { key } if key.name == "b"));
    }

    #[test]
    fn hosts_are_keyed_by_namespace_and_name() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &format!(
                "{HOST_A}---\n{}",
                HOST_A.replace("name: a", "name: a\n  namespace: other")
            ),
        );
        let mut src = FilesSource::new(dir.path());
        src.scan();
        let snap = src.snapshot();
        assert_eq!(snap.problems, vec![]);
        let keys: Vec<String> = snap.hosts.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["default/a", "other/a"]);
    }

    fn problem_of(src: &FilesSource, file: &str) -> String {
        src.snapshot()
            .problems
            .iter()
            .find(|p| p.path.ends_with(file))
            .map(ToString::to_string)
            .unwrap_or_else(|| panic!("no problem for {file}"))
    }

    #[test]
    fn an_emptied_file_keeps_its_hosts_until_it_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &format!("{HOST_A}---\n{HOST_B}"));
        let mut src = FilesSource::new(dir.path());
        src.scan();
        write(dir.path(), "a.yaml", "");
        assert!(src.scan());
        assert_eq!(src.snapshot().hosts.len(), 2, "kept");
        let p = problem_of(&src, "a.yaml");
        assert!(
            p.contains("empty") && p.contains("keeping the 2 host(s)"),
            "{p}"
        );
        // Written again: the problem goes.
        write(dir.path(), "a.yaml", HOST_A);
        src.scan();
        assert!(src.snapshot().problems.is_empty());
        assert_eq!(src.snapshot().hosts.len(), 1);
    }

    #[test]
    fn dangling_and_outside_symlinks_keep_the_hosts_and_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        fs::create_dir(&hosts).unwrap();
        write(&hosts, "real.yaml", HOST_A);
        std::os::unix::fs::symlink(hosts.join("real.yaml"), hosts.join("link.yaml")).unwrap();
        write(dir.path(), "outside.yaml", HOST_B);
        let mut src = FilesSource::new(&hosts);
        src.scan();
        assert!(src.snapshot().hosts.contains_key(&k("a")));
        // The link's target goes away: the link cannot be stat'ed.
        fs::remove_file(hosts.join("real.yaml")).unwrap();
        src.scan();
        let snap = src.snapshot();
        assert!(
            snap.hosts.contains_key(&k("a")),
            "kept while the link dangles"
        );
        let p = problem_of(&src, "link.yaml");
        assert!(
            p.contains("cannot stat") && p.contains("keeping the 1 host(s)"),
            "{p}"
        );
        // A link to a file outside the directory is refused, even though it parses.
        std::os::unix::fs::symlink(dir.path().join("outside.yaml"), hosts.join("out.yaml"))
            .unwrap();
        src.scan();
        assert!(!src.snapshot().hosts.contains_key(&k("b")));
        let p = problem_of(&src, "out.yaml");
        assert!(p.contains("outside the hosts directory"), "{p}");
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing_and_quickly() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", HOST_A);
        let mut src = FilesSource::new(dir.path());
        src.scan();
        write(dir.path(), "a.yaml", &"[".repeat(200 * 1024));
        let t = std::time::Instant::now();
        src.scan();
        assert!(
            t.elapsed() < std::time::Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!(
            src.snapshot().hosts.contains_key(&k("a")),
            "the last good version stays"
        );
        let p = problem_of(&src, "a.yaml");
        assert!(
            p.contains("nested deeper than 64") && p.contains("line 1"),
            "{p}"
        );
        // Quoted brackets and comments are not nesting.
        assert!(nesting(&format!("a: \"{}\" # {}", "[".repeat(100), "{".repeat(100))).is_ok());
        assert!(nesting(&format!("{}x: 1", " ".repeat(300))).is_err());
    }

    #[test]
    fn a_host_declared_in_two_files_keeps_its_first_declaration_and_names_both() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.yaml", HOST_A);
        let mut src = FilesSource::new(dir.path());
        let mut differ = Differ::default();
        src.scan();
        let first = differ.diff(&src.snapshot());
        assert!(matches!(&first[0], SourceEvent::Declared { key, .. } if *key == k("a")));
        // A second file (sorting first) declares the same host differently.
        write(
            dir.path(),
            "a.yaml",
            &HOST_A.replace("online: true", "online: false"),
        );
        src.scan();
        let snap = src.snapshot();
        assert!(
            !snap.hosts.contains_key(&k("a")),
            "neither declaration wins"
        );
        assert_eq!(snap.problems.len(), 2, "{:?}", snap.problems);
        for p in &snap.problems {
            assert!(
                p.message.contains("a.yaml") && p.message.contains("b.yaml"),
                "{}",
                p.message
            );
        }
        let events = differ.diff(&snap);
        assert!(
            events.iter().any(
                |e| matches!(e, SourceEvent::Conflict { key, why: Some(_), .. } if *key == k("a"))
            ),
            "{events:?}"
        );
        assert!(
            !events.iter().any(|e| matches!(
                e,
                SourceEvent::Declared { .. } | SourceEvent::Undeclared { .. }
            )),
            "the host keeps its declaration: {events:?}"
        );
        // Two scans later it is still declared (not missing).
        src.scan();
        let again = differ.diff(&src.snapshot());
        assert!(
            !again
                .iter()
                .any(|e| matches!(e, SourceEvent::Undeclared { .. }))
        );
        // Removing one resolves it: the remaining declaration is sent.
        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        src.scan();
        let events = differ.diff(&src.snapshot());
        assert!(
            events
                .iter()
                .any(|e| matches!(e, SourceEvent::Conflict { why: None, .. }))
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, SourceEvent::Declared { host, .. } if host.spec.online))
        );
    }
}
