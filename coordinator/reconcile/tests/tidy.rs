//! Architecture check: the state machine stays pure. `plan` gets time as an argument and
//! returns actions; if this crate could read the clock or touch files, its tests would stop
//! being deterministic and the executor would stop being the only place that acts.

use std::fs;
use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "Timestamp::now",
    "SystemTime",
    "Instant::now",
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "std::env",
    "tokio",
    "println!",
    "eprintln!",
];

#[test]
fn reconcile_does_no_io_and_reads_no_clock() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offences = Vec::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            for word in FORBIDDEN {
                if line.contains(word) && !line.trim_start().starts_with("//") {
                    offences.push(format!("{}:{}: {word}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "reconcile must stay pure:\n{}",
        offences.join("\n")
    );
}
