//! Enrolment: a TLS connection with no client certificate, the coordinator's CA pinned by
//! fingerprint; the one-time token and a CSR for a fresh key buy a client certificate. The key
//! and certificate are kept in the state directory (0600), so a restarted agent process does
//! not need a new token.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use slipway_proto::v1 as pb;
use tracing::info;

use super::{Refused, Settings, agent_info, connect, is_refusal};
use crate::tls::{self, Fingerprint};

/// The agent's credentials.
#[derive(Clone)]
pub struct Identity {
    pub host: String,
    /// The host's namespace (empty from coordinators that predate namespaces).
    pub namespace: String,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl Identity {
    /// `namespace/name`, or the name alone when the coordinator gave no namespace.
    pub fn key(&self) -> String {
        if self.namespace.is_empty() {
            self.host.clone()
        } else {
            format!("{}/{}", self.namespace, self.host)
        }
    }

    /// The private key (PKCS#8 DER) the certificate was issued for.
    pub(super) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host", &self.host)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// How long one enrolment request may wait for the coordinator's answer.
const ENROL_LIMIT: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(20)
};

/// Enrols with the token, or loads the identity saved by an earlier run.
pub async fn identity(s: &Settings) -> anyhow::Result<Identity> {
    if let Some(id) = load_identity(&s.state_dir, s.ca)? {
        info!(host = %id.key(), "using the certificate from an earlier enrolment in {}", s.state_dir.display());
        return Ok(id);
    }
    let token = s.token.clone().ok_or_else(|| {
        anyhow!("no bootstrap token: pass --token or slipway.token= (create one with `slipway token create HOST`)")
    })?;
    let (id, not_after) = enroll(s, &token).await?;
    save_identity(&s.state_dir, &id)?;
    info!(host = %id.key(), "enrolled; certificate valid until {not_after}");
    if s.milestones {
        crate::console::milestone("enrolled", &format!("host={}", id.key()));
    }
    Ok(id)
}

/// Exchanges the one-time `token` for a certificate: a fresh key, a CSR, the `Enroll` call on
/// a TLS connection that pins the coordinator's CA. Keeps nothing on disk (see [`identity`]).
/// Returns the identity and the certificate's expiry, as the coordinator wrote it.
pub async fn enroll(s: &Settings, token: &str) -> anyhow::Result<(Identity, String)> {
    let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).context("cannot build a CSR")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "slipway-agent");
    let csr = params
        .serialize_request(&key)
        .context("cannot sign the CSR")?;
    let channel = connect(&s.address, tls::enroll_config(s.ca)?)
        .await
        .with_context(|| format!("enrolment with {}", s.address))?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let request = client.enroll(pb::EnrollRequest {
        token: token.to_string(),
        csr_der: csr.der().to_vec(),
        agent: Some(agent_info(s)),
    });
    // A coordinator that took the connection but never answers (stopped, overloaded) must not
    // hold the agent forever: give up on this attempt, and the caller enrols again.
    let response = tokio::time::timeout(ENROL_LIMIT, request)
        .await
        .map_err(|_| {
            anyhow!(
                "the coordinator at {} did not answer the enrolment within {ENROL_LIMIT:?}",
                s.address
            )
        })?
        .map_err(|st| anyhow::Error::new(Refused(st.message().to_string(), is_refusal(&st))))?
        .into_inner();
    if Fingerprint::of(&response.ca_certificate_der) != s.ca {
        bail!(
            "the coordinator sent a CA certificate that does not match the pinned fingerprint {}",
            s.ca
        );
    }
    let id = Identity {
        host: response.host,
        namespace: response.namespace,
        cert_der: response.certificate_der,
        ca_der: response.ca_certificate_der,
        key_der: key.serialize_der(),
    };
    Ok((id, response.not_after))
}

fn load_identity(dir: &Path, pin: Fingerprint) -> anyhow::Result<Option<Identity>> {
    let read = |n: &str| fs::read(dir.join(n));
    let (Ok(host), Ok(cert_der), Ok(ca_der), Ok(key_der)) = (
        read("host"),
        read("cert.der"),
        read("ca.der"),
        read("key.der"),
    ) else {
        return Ok(None);
    };
    if Fingerprint::of(&ca_der) != pin {
        // Enrolled with another coordinator: start over.
        return Ok(None);
    }
    Ok(Some(Identity {
        host: String::from_utf8_lossy(&host).trim().to_string(),
        // Absent in state directories written before namespaces: the default namespace.
        namespace: fs::read(dir.join("namespace"))
            .map(|n| String::from_utf8_lossy(&n).trim().to_string())
            .unwrap_or_default(),
        cert_der,
        ca_der,
        key_der,
    }))
}

fn save_identity(dir: &Path, id: &Identity) -> anyhow::Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    for (name, data) in [
        ("key.der", &id.key_der[..]),
        ("cert.der", &id.cert_der[..]),
        ("ca.der", &id.ca_der[..]),
        ("host", id.host.as_bytes()),
        ("namespace", id.namespace.as_bytes()),
    ] {
        let path = dir.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(data)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Forgets the saved identity (the coordinator no longer accepts it).
pub fn forget_identity(dir: &Path) {
    for name in ["key.der", "cert.der", "ca.der", "host", "namespace"] {
        let _ = fs::remove_file(dir.join(name));
    }
}

/// Against a coordinator that completes TLS but never answers `Enroll`.
#[cfg(test)]
mod silent_coordinator {
    use std::pin::Pin;

    use tokio_stream::Stream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    struct Silent;

    #[tonic::async_trait]
    impl pb::agent_service_server::AgentService for Silent {
        async fn enroll(
            &self,
            _: Request<pb::EnrollRequest>,
        ) -> Result<Response<pb::EnrollResponse>, Status> {
            std::future::pending().await
        }

        type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::Command, Status>> + Send>>;

        async fn session(
            &self,
            _: Request<Streaming<pb::AgentEvent>>,
        ) -> Result<Response<Self::SessionStream>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    /// A CA and a server certificate for [`tls::SERVER_NAME`]: (CA DER, chain PEM, key PEM).
    fn server_identity() -> (Vec<u8>, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![tls::SERVER_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &rcgen::Issuer::new(ca, &ca_key))
            .unwrap();
        (
            ca_cert.der().to_vec(),
            format!("{}{}", leaf.pem(), ca_cert.pem()),
            key.serialize_pem(),
        )
    }

    #[tokio::test]
    async fn an_enrolment_never_answered_is_given_up_so_the_agent_can_enrol_again() {
        let (ca_der, chain, key) = server_identity();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tonic::transport::Server::builder()
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(chain, key)),
            )
            .unwrap()
            .add_service(pb::agent_service_server::AgentServiceServer::new(Silent))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            address: address.clone(),
            token: Some("t".into()),
            ca: Fingerprint::of(&ca_der),
            state_dir: dir.path().to_path_buf(),
            boot_mac: None,
            ramdisk: false,
            heartbeat: Duration::from_secs(5),
            exit_on_refusal: true,
            reconnect_jitter: Duration::ZERO,
            milestones: false,
        };
        let start = std::time::Instant::now();
        let e = tokio::time::timeout(ENROL_LIMIT * 3, identity(&settings))
            .await
            .expect("the enrolment gives up by itself")
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("did not answer"), "{text}");
        assert!(
            text.contains(&address),
            "the error names the coordinator: {text}"
        );
        // Not a refusal: the caller retries instead of exiting.
        assert!(e.downcast_ref::<Refused>().is_none());
        assert!(start.elapsed() >= ENROL_LIMIT);
        server.abort();
    }
}
