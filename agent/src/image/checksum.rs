//! Digests: the algorithms, the streaming hasher, and picking an image's line out of a
//! checksum file (`SHA256SUMS` style). Pure functions; fetching the file is `source`'s job.

use std::fmt;

use sha2::Digest;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    Md5,
    Sha256,
    Sha512,
}

impl Algo {
    /// The algorithm a hex digest's length implies.
    pub fn from_hex_len(len: usize) -> Option<Algo> {
        match len {
            32 => Some(Algo::Md5),
            64 => Some(Algo::Sha256),
            128 => Some(Algo::Sha512),
            _ => None,
        }
    }

    pub fn hex_len(self) -> usize {
        match self {
            Algo::Md5 => 32,
            Algo::Sha256 => 64,
            Algo::Sha512 => 128,
        }
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algo::Md5 => "md5",
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        })
    }
}

/// The warning logged when an image is verified with md5.
pub const MD5_WARNING: &str = "md5 is deprecated for image checksums (accepted for metal3 \
     compatibility); publish a sha256 or sha512 digest instead";

/// Where the expected digest comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// A hex digest (lower case) and its algorithm.
    Digest { algo: Algo, hex: String },
    /// A checksum file to fetch; the algorithm is the declared one or, if none, the one the
    /// digest's length implies.
    Url { url: String, algo: Option<Algo> },
}

/// Checks a hex digest against a declared algorithm (`None`: chosen by length).
pub fn check_digest(digest: &str, algo: Option<Algo>) -> Result<(Algo, String), String> {
    let hex = digest.trim().to_ascii_lowercase();
    if hex.is_empty() {
        return Err(
            "a checksum is required: give the image's digest (e.g. the output of \
                    sha256sum IMAGE) or the URL of a checksum file"
                .into(),
        );
    }
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("checksum {hex:?} is not a hex digest"));
    }
    match algo {
        Some(a) if a.hex_len() == hex.len() => Ok((a, hex)),
        Some(a) => Err(format!(
            "checksum type is {a} but the digest has {} hex digits, not {}",
            hex.len(),
            a.hex_len()
        )),
        None => match Algo::from_hex_len(hex.len()) {
            Some(a) => Ok((a, hex)),
            None => Err(format!(
                "a digest of {} hex digits matches no algorithm (md5 32, sha256 64, sha512 128)",
                hex.len()
            )),
        },
    }
}

/// The streaming hasher for one algorithm.
pub enum Hasher {
    Md5(md5::Md5),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algo: Algo) -> Hasher {
        match algo {
            Algo::Md5 => Hasher::Md5(md5::Md5::new()),
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// The last path segment of a URL, without query or fragment, percent-decoded.
pub fn file_name_of(url: &str) -> String {
    let no_frag = url.split('#').next().unwrap_or("");
    let path = no_frag.split('?').next().unwrap_or("");
    let last = path.rsplit('/').next().unwrap_or("");
    percent_decode(last)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Picks the digest for `file_name` out of a checksum file. Understands coreutils lines
/// (`HEX  name`, `HEX *name`), BSD lines (`SHA256 (name) = HEX`), and a file holding a single
/// bare digest. Names match exactly or by their last path segment (`./os.img`, `dir/os.img`).
/// With `algo` given, only digests of its length count.
pub fn pick_from_checksum_file(
    text: &str,
    file_name: &str,
    algo: Option<Algo>,
) -> Result<(Algo, String), String> {
    let fits = |hex: &str| {
        hex.bytes().all(|b| b.is_ascii_hexdigit())
            && match algo {
                Some(a) => hex.len() == a.hex_len(),
                None => Algo::from_hex_len(hex.len()).is_some(),
            }
    };
    let same_name = |name: &str| {
        let name = name.trim();
        name == file_name || name.rsplit('/').next() == Some(file_name)
    };
    let mut bare = Vec::new();
    let mut lines = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        lines += 1;
        // BSD: ALGO (name) = HEX
        if let Some((left, hex)) = line.rsplit_once(") = ")
            && let Some((_, name)) = left.split_once(" (")
        {
            let hex = hex.trim();
            if same_name(name) && fits(hex) {
                return check_digest(hex, algo);
            }
            continue;
        }
        let mut parts = line.splitn(2, char::is_whitespace);
        let hex = parts.next().unwrap_or("");
        match parts.next() {
            Some(rest) => {
                let name = rest.trim_start().trim_start_matches('*');
                if same_name(name) && fits(hex) {
                    return check_digest(hex, algo);
                }
            }
            None if fits(hex) => bare.push(hex),
            None => {}
        }
    }
    if lines == 1 && bare.len() == 1 {
        return check_digest(bare[0], algo);
    }
    Err(format!(
        "no {}digest for {file_name:?} in the checksum file ({lines} lines); it needs a line \
         like `HEX  {file_name}`",
        algo.map(|a| format!("{a} ")).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_against_their_algorithm() {
        assert_eq!(
            check_digest(&"AB".repeat(32), None),
            Ok((Algo::Sha256, "ab".repeat(32)))
        );
        assert_eq!(check_digest(&"a".repeat(32), None).unwrap().0, Algo::Md5);
        assert!(check_digest("", None).unwrap_err().contains("required"));
        assert!(
            check_digest(&"a".repeat(64), Some(Algo::Sha512))
                .unwrap_err()
                .contains("not 128")
        );
        assert!(check_digest("xyz", None).unwrap_err().contains("not a hex"));
        assert!(
            check_digest("abc", None)
                .unwrap_err()
                .contains("3 hex digits")
        );
    }

    #[test]
    fn names_from_urls() {
        assert_eq!(file_name_of("http://h/a/b/os.img?x=1#f"), "os.img");
        assert_eq!(file_name_of("http://h/my%20os.qcow2"), "my os.qcow2");
        assert_eq!(file_name_of("http://h/"), "");
        assert_eq!(file_name_of("http://h/%zz%4"), "%zz%4");
    }

    #[test]
    fn picks_the_images_line() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let c = "c".repeat(128);
        let text = format!(
            "# comment\n{a}  other.img\n{b} *os.img\nSHA512 (os.img) = {c}\n{a}  ./dir/x.img\n"
        );
        assert_eq!(
            pick_from_checksum_file(&text, "os.img", None),
            Ok((Algo::Sha256, b.clone()))
        );
        assert_eq!(
            pick_from_checksum_file(&text, "os.img", Some(Algo::Sha512)),
            Ok((Algo::Sha512, c.clone()))
        );
        assert_eq!(
            pick_from_checksum_file(&text, "x.img", None),
            Ok((Algo::Sha256, a.clone()))
        );
        let err = pick_from_checksum_file(&text, "missing.img", None).unwrap_err();
        assert!(
            err.contains("missing.img") && err.contains("4 lines"),
            "{err}"
        );
        // A file with only a digest (what IPA also accepts).
        assert_eq!(
            pick_from_checksum_file(&format!("{b}\n"), "os.img", None),
            Ok((Algo::Sha256, b.clone()))
        );
        // Two bare digests: ambiguous.
        assert!(pick_from_checksum_file(&format!("{a}\n{b}\n"), "os.img", None).is_err());
        // A line for the image with a digest of the wrong length is not used.
        assert!(
            pick_from_checksum_file(&format!("{a}  os.img\n"), "os.img", Some(Algo::Md5)).is_err()
        );
        // Garbage never panics.
        for junk in ["", ") = ", " (", "SHA256 () = ", "*", "\u{0}\u{1}"] {
            let _ = pick_from_checksum_file(junk, "os.img", None);
        }
    }

    #[test]
    fn hashers_match_known_digests() {
        let mut h = Hasher::new(Algo::Sha256);
        h.update(b"abc");
        assert_eq!(
            h.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Hasher::new(Algo::Md5);
        h.update(b"abc");
        assert_eq!(h.hex(), "900150983cd24fb0d6963f7d28e17f72");
    }
}
