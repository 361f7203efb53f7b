//! TLS for the agent: the coordinator's CA is pinned by the SHA-256 of its certificate.
//!
//! Before enrolment the agent knows only the fingerprint (from the kernel command line), so
//! [`PinnedCaVerifier`] finds the CA among the certificates the server sends, checks its
//! fingerprint, and verifies the server certificate against it (name, expiry, EKU serverAuth).
//! After enrolment the agent has the CA certificate itself and uses the standard verifier.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// The name every coordinator server certificate carries (see the coordinator's `pki`).
pub const SERVER_NAME: &str = "coordinator.slipway.internal";

/// A SHA-256 fingerprint, parsed from `sha256:HEX`, `HEX` or `AA:BB:...`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn parse(s: &str) -> Result<Fingerprint, String> {
        let t = s.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .unwrap_or(t);
        let hex_only: String = t.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&hex_only)
            .map_err(|_| format!("{s:?} is not a hex SHA-256 fingerprint"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("{s:?} is not a SHA-256 fingerprint (64 hex digits)"))?;
        Ok(Fingerprint(arr))
    }

    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies the server against the CA in its own chain whose fingerprint is pinned.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(pin: Fingerprint) -> PinnedCaVerifier {
        PinnedCaVerifier {
            pin,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| Fingerprint::of(c) == self.pin).ok_or_else(|| {
            rustls::Error::General(format!(
                "the coordinator's CA does not match the pinned fingerprint {} (wrong coordinator, \
                 or slipway.ca= is out of date)",
                self.pin
            ))
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS for `Enroll`: no client certificate, CA pinned.
pub fn enroll_config(pin: Fingerprint) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = one_connection();
    Ok(config)
}

/// Session resumption off: each configuration serves one connection (a new one is built for
/// every enrolment and every session), so its resumption cache, 14 KiB of empty slots, would
/// never be used; the load generator holds thousands of them.
fn one_connection() -> rustls::client::Resumption {
    rustls::client::Resumption::disabled()
}

/// TLS for `Session`: our client certificate, the coordinator CA as the only root.
pub fn session_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = one_connection();
    Ok(config)
}

/// TLS for downloading images: the public web roots (compiled in: the ramdisk has no store),
/// the machine's own store where it has one (`/etc/ssl/certs`, or `SSL_CERT_FILE` /
/// `SSL_CERT_DIR`: an operator's private CA, for the standalone `write-image`), plus the
/// coordinator CA (if known) and any extra CAs the command carries.
pub fn download_config(extra_ca_der: &[Vec<u8>]) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("the machine's certificate store: {e}");
    }
    let (added, unusable) = roots.add_parsable_certificates(native.certs);
    if added + unusable > 0 {
        tracing::debug!(
            "{added} CA certificates from the machine's store ({unusable} unusable ones skipped)"
        );
    }
    for der in extra_ca_der {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_forms() {
        let hex = "ab".repeat(32);
        let a = Fingerprint::parse(&hex).unwrap();
        assert_eq!(Fingerprint::parse(&format!("sha256:{hex}")).unwrap(), a);
        let colons = (0..32).map(|_| "AB").collect::<Vec<_>>().join(":");
        assert_eq!(Fingerprint::parse(&colons).unwrap(), a);
        assert_eq!(a.to_string(), format!("sha256:{hex}"));
        assert!(Fingerprint::parse("abc").is_err());
        assert!(
            Fingerprint::parse(&"ab".repeat(31))
                .unwrap_err()
                .contains("64 hex digits")
        );
    }
}
