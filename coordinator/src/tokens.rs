//! One-time bootstrap tokens.
//!
//! A token is 32 random bytes, base64url encoded (43 characters). The coordinator stores only
//! its SHA-256, and logs only a short fingerprint of that hash, so neither the store nor the
//! log can be used to enrol.

use std::fmt;

use base64::Engine;
use sha2::{Digest, Sha256};

/// A token secret. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret(String);

impl TokenSecret {
    pub fn new(s: impl Into<String>) -> TokenSecret {
        TokenSecret(s.into())
    }

    /// The secret itself, to hand to the operator or the kernel command line.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Hex SHA-256: the key the store keeps.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.0.trim().as_bytes()))
    }

    /// A short, non-secret name for logs: the first 8 hex digits of the hash.
    pub fn fingerprint(&self) -> String {
        let mut h = self.hash();
        h.truncate(8);
        format!("sha256:{h}")
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSecret({})", self.fingerprint())
    }
}

impl fmt::Display for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<token {}>", self.fingerprint())
    }
}

pub fn generate() -> Result<TokenSecret, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(TokenSecret(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_never_printed() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 43);
        for shown in [format!("{a:?}"), format!("{a}")] {
            assert!(!shown.contains(a.expose()), "{shown}");
            assert!(shown.contains(&a.fingerprint()));
        }
        assert_eq!(a.hash().len(), 64);
    }
}
