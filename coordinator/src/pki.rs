//! The coordinator's certificate authority.
//!
//! On first start the coordinator creates a CA (ECDSA P-256) under `STATE/pki/`; the CA key
//! never leaves that directory (mode 0600). At every start it issues itself a fresh server
//! certificate, and it signs one client certificate per agent enrolment. Agents pin the CA by
//! the SHA-256 fingerprint of its DER encoding.
//!
//! Identity: an agent certificate names exactly one host, as the URI SAN
//! `urn:slipway:host:<namespace>/<name>` (and its name as CN; `urn:slipway:host:<name>`, from
//! before namespaces, names a host of the default namespace). The coordinator also records the
//! fingerprint of the newest certificate per host, so an older certificate of the same host
//! (from an earlier enrolment) is refused.
//!
//! Invariant: the server certificate has only the serverAuth EKU and agent certificates only
//! clientAuth, so an agent's certificate cannot impersonate the coordinator.

use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use sha2::{Digest, Sha256};
use slipway_reconcile::host::HostKey;

/// The DNS name every server certificate carries and every agent verifies, whatever address
/// it dialled: the CA is private to this coordinator, so the name need not be in DNS.
pub const SERVER_NAME: &str = "coordinator.slipway.internal";

/// Prefix of the URI SAN naming a host in an agent certificate.
pub const HOST_URI_PREFIX: &str = "urn:slipway:host:";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} in {}: {source}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot {0}")]
    Rcgen(&'static str, #[source] rcgen::Error),
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(#[source] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The loaded CA: signs the server certificate and agent certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// A certificate and its private key, ready for rustls.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Ca {
    /// Loads the CA from `dir` (`ca.crt`, `ca.key`), creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let crt = dir.join("ca.crt");
        let key = dir.join("ca.key");
        if !crt.exists() {
            create_dir(dir)?;
            let pair =
                KeyPair::generate().map_err(|e| PkiError::Rcgen("generate the CA key", e))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "Slipway coordinator CA");
            params
                .distinguished_name
                .push(DnType::OrganizationName, "Slipway");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.serial_number = Some(random_serial());
            let now = Timestamp::now();
            params.not_before = to_offset(now - SignedDuration::from_hours(1));
            params.not_after = to_offset(now + SignedDuration::from_hours(24 * 365 * 20));
            let cert = params
                .self_signed(&pair)
                .map_err(|e| PkiError::Rcgen("self-sign the CA certificate", e))?;
            // Key first: a crash in between leaves no certificate without its key.
            write_private(&key, pair.serialize_pem().as_bytes())?;
            write_file(&crt, cert.pem().as_bytes())?;
        }
        let key_pem = read(&key)?;
        let crt_pem = read(&crt)?;
        let pair = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Invalid {
            what: "bad CA key",
            path: key.clone(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&crt_pem, pair).map_err(|source| PkiError::Invalid {
                what: "bad CA certificate",
                path: crt.clone(),
                source,
            })?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(crt_pem.as_bytes())
            .map_err(|_| PkiError::Invalid {
                what: "bad CA certificate PEM",
                path: crt,
                source: rcgen::Error::CouldNotParseCertificate,
            })?;
        Ok(Ca {
            issuer,
            cert_der,
            cert_pem: crt_pem,
        })
    }

    /// `sha256:<hex>` of the CA certificate's DER: what agents pin.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", sha256_hex(&self.cert_der))
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues the coordinator's server certificate for `names` (DNS names or IP addresses)
    /// besides [`SERVER_NAME`].
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, PkiError> {
        let pair =
            KeyPair::generate().map_err(|e| PkiError::Rcgen("generate the server key", e))?;
        let mut all = vec![
            SERVER_NAME.to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        for n in names {
            if !all.contains(n) {
                all.push(n.clone());
            }
        }
        let mut params = CertificateParams::new(all)
            .map_err(|e| PkiError::Rcgen("build the server certificate", e))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        let now = Timestamp::now();
        params.not_before = to_offset(now - SignedDuration::from_hours(1));
        params.not_after = to_offset(now + SignedDuration::from_hours(24 * 365));
        let cert = params
            .signed_by(&pair, &self.issuer)
            .map_err(|e| PkiError::Rcgen("sign the server certificate", e))?;
        Ok(Issued {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der())),
        })
    }

    /// Signs an agent's CSR: the certificate names `host` and nothing else, whatever the CSR
    /// asked for. The CSR's signature is checked (proof that the agent holds the key).
    pub fn sign_agent(
        &self,
        host: &HostKey,
        csr_der: &[u8],
        valid_for: SignedDuration,
        now: Timestamp,
    ) -> Result<AgentCert, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        // The common name is the host's name (X.509 allows 64 characters); the identity
        // Slipway checks is the URI, which carries the namespace too.
        let cn: String = host.name.chars().take(64).collect();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = vec![SanType::URI(
            format!("{HOST_URI_PREFIX}{host}")
                .try_into()
                .map_err(|e| PkiError::Rcgen("encode the host name", e))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        params.not_before = to_offset(now - SignedDuration::from_mins(5));
        let not_after = now.checked_add(valid_for).unwrap_or(Timestamp::MAX);
        params.not_after = to_offset(not_after);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| PkiError::Rcgen("sign the agent certificate", e))?;
        Ok(AgentCert {
            sha256: sha256_hex(cert.der()),
            der: cert.der().to_vec(),
            not_after,
        })
    }

    /// The rustls server configuration: our server certificate; client certificates optional
    /// at the TLS layer (Enroll has none) but, when presented, verified against this CA.
    pub fn server_tls(&self, names: &[String]) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let issued = self.issue_server(names)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(issued.chain, issued.key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// An agent certificate just issued.
#[derive(Clone, Debug)]
pub struct AgentCert {
    pub der: Vec<u8>,
    /// Hex SHA-256 of `der`, recorded as the host's current certificate.
    pub sha256: String,
    pub not_after: Timestamp,
}

/// The host named by an agent certificate (already verified against the CA by TLS). A
/// certificate from before namespaces (`urn:slipway:host:NAME`) names a host of the default
/// namespace.
pub fn host_of(cert_der: &[u8]) -> Result<HostKey, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("the client certificate names no host (no subjectAltName)")?;
    let hosts: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(HOST_URI_PREFIX),
            _ => None,
        })
        .collect();
    match hosts.as_slice() {
        [one] => HostKey::parse(one)
            .ok_or_else(|| format!("the client certificate names an invalid host {one:?}")),
        [] => Err("the client certificate names no host".into()),
        _ => Err("the client certificate names more than one host".into()),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A failure of the OS RNG leaves zeros; serials need only be unique-ish, keys come from ring.
    let _ = getrandom::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn to_offset(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        action: "create",
        path: dir.into(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| PkiError::Io {
        action: "restrict permissions of",
        path: dir.into(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.into(),
        source,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    fs::write(path, data).map_err(|source| PkiError::Io {
        action: "write",
        path: path.into(),
        source,
    })
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| PkiError::Io {
            action: "create",
            path: path.into(),
            source,
        })?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|source| PkiError::Io {
            action: "write",
            path: path.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_signs_a_host_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let agent_key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        req.distinguished_name.push(DnType::CommonName, "host-b");
        let csr = req.serialize_request(&agent_key).unwrap();
        let cert = ca
            .sign_agent(
                &HostKey::new("team-a", "host-a"),
                csr.der(),
                SignedDuration::from_hours(1),
                Timestamp::now(),
            )
            .unwrap();
        // The CSR asked for other names; the certificate names team-a/host-a only.
        assert_eq!(
            host_of(&cert.der).unwrap(),
            HostKey::new("team-a", "host-a")
        );
        assert_eq!(cert.sha256, sha256_hex(&cert.der));
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let err = ca
            .sign_agent(
                &HostKey::default_ns("h"),
                b"not a csr",
                SignedDuration::from_hours(1),
                Timestamp::now(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("signing request"), "{err}");
    }

    #[test]
    fn server_certificate_is_not_a_host_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let issued = ca.issue_server(&[]).unwrap();
        assert!(host_of(&issued.chain[0]).is_err());
    }
}
