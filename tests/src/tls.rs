//! Throwaway certificates for TLS tests (a private CA and a server certificate it signed
//! for `localhost` and `127.0.0.1`, generated at test time), and a TLS-terminating proxy
//! that puts an `amqps://` endpoint in front of the test broker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A private CA and one server certificate it signed, as PEM files in a fresh directory
/// (removed on drop).
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA certificate: what a client's `ca_file` names.
    pub ca_cert: PathBuf,
    /// The server certificate (for `localhost` and `127.0.0.1`), signed by the CA.
    pub server_cert: PathBuf,
    /// The server certificate's private key (PKCS#8).
    pub server_key: PathBuf,
    /// The server certificate and key, in PEM.
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl TestPki {
    /// Generate a CA named `sluice test CA <random>` and a server certificate signed by it.
    pub fn generate() -> Self {
        let dir =
            std::env::temp_dir().join(format!("sluice-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("pki dir");

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!(
                "sluice test CA {}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        );
        ca_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = params
            .signed_by(&server_key, &issuer)
            .expect("sign the server cert");

        let server_cert_pem = server_cert.pem();
        let server_key_pem = server_key.serialize_pem();
        let pki = Self {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            dir,
            server_cert_pem,
            server_key_pem,
        };
        std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write CA");
        std::fs::write(&pki.server_cert, &pki.server_cert_pem).expect("write cert");
        std::fs::write(&pki.server_key, &pki.server_key_pem).expect("write key");
        pki
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS-terminating proxy on 127.0.0.1: clients speak TLS to it (with the [`TestPki`]
/// server certificate) and it forwards the plaintext to `upstream`. In front of the test
/// broker it is an `amqps://` endpoint, without touching the broker's own configuration.
pub struct TlsProxy {
    pub port: u16,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    /// Listen on a free loopback port; forward each TLS session to `upstream` (`host:port`).
    pub async fn start(pki: &TestPki, upstream: &str) -> Self {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;

        let certs = CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("server certificate");
        let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).expect("server key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counter = handshakes.clone();
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    // A client that rejects our certificate ends here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self {
            port,
            handshakes,
            task,
        }
    }

    /// TLS sessions completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
