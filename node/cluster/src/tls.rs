//! TLS for the QUIC data plane: each node has a fresh self-signed
//! certificate; peers are trusted by its SHA-256 fingerprint, learned over
//! the key-authenticated control plane. Both sides present certificates, so
//! only cluster members can open or accept a data connection.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// ALPN of the data plane, versioned with the protocol.
const ALPN: &[u8] = b"shoal-data/1";

/// A certificate fingerprint: SHA-256 of its DER bytes.
pub type Fingerprint = [u8; 32];

/// Fingerprints allowed to connect to this node's data plane (the current
/// members'), shared with membership which updates it.
pub type AllowList = Arc<RwLock<HashSet<Fingerprint>>>;

/// This node's data-plane identity.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    /// Fingerprint peers pin.
    pub fingerprint: Fingerprint,
}

impl Identity {
    /// A new self-signed certificate (per process: nothing to copy between machines).
    pub fn generate() -> Identity {
        let ck = rcgen::generate_simple_self_signed(vec!["shoal".to_string()])
            .expect("self-signed certificate");
        let cert = ck.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
        Identity {
            fingerprint: fingerprint(&cert),
            cert,
            key,
        }
    }

    /// Server side: accepts clients whose certificate is on `allowed`.
    pub fn server_config(&self, allowed: AllowList) -> quinn::ServerConfig {
        let provider = provider();
        let tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(Arc::new(Pinned {
                allowed: Allowed::List(allowed),
                provider,
            }))
            .with_single_cert(vec![self.cert.clone()], self.private_key())
            .expect("own certificate");
        let mut tls = tls;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).expect("TLS 1.3 config for QUIC");
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport());
        config
    }

    /// Client side: connects only to the server with certificate `pinned`.
    pub fn client_config(&self, pinned: Fingerprint) -> quinn::ClientConfig {
        let provider = provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                allowed: Allowed::One(pinned),
                provider,
            }))
            .with_client_auth_cert(vec![self.cert.clone()], self.private_key())
            .expect("own certificate");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).expect("TLS 1.3 config for QUIC");
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport());
        config
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Transport settings shared by both ends.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Keep-alives every 2 s and a 10 s idle timeout: a dead stage is noticed
    // within seconds even when no request is running.
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    t.max_idle_timeout(Some(
        std::time::Duration::from_secs(10)
            .try_into()
            .expect("valid idle timeout"),
    ));
    Arc::new(t)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Fingerprint {
    Sha256::digest(cert.as_ref()).into()
}

#[derive(Debug)]
enum Allowed {
    One(Fingerprint),
    List(AllowList),
}

/// Trusts certificates by fingerprint (no CA: the control plane vouched for them).
#[derive(Debug)]
struct Pinned {
    allowed: Allowed,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = fingerprint(cert);
        let ok = match &self.allowed {
            Allowed::One(p) => *p == fp,
            Allowed::List(l) => l.read().expect("allow list lock").contains(&fp),
        };
        if ok {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Makes ring the process's rustls provider (for other TLS clients in the
/// process, such as the API's upstream client); a no-op once one is set.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
