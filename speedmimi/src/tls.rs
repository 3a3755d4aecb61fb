//! rustls on both sides of the proxy: the server certificates (chosen by SNI, swapped on reload
//! without touching live connections) and the client side of `https` backends.

use std::{
    collections::HashMap,
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use arc_swap::ArcSwap;
use rustls::{
    ClientConfig, DigitallySignedStruct, InconsistentKeys, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, UnixTime,
    pem::{self, PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

use crate::config::{BackendSection, Scheme, SslSection};

/// Why certificates could not be loaded. Each variant names the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: unusable private key: {source}", path.display())]
    Key { path: PathBuf, source: rustls::Error },
    #[error("{}: invalid certificate: {source}", path.display())]
    Certificate { path: PathBuf, source: rustls::Error },
    #[error("private key {} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS is not enabled (ssl.enabled is false)")]
    Disabled,
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// The one crypto provider of the process (ring), passed explicitly so nothing depends on a
/// process-wide default being installed.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// TLS termination: a server config whose certificates can be replaced while it serves.
pub struct TlsState {
    certs: Arc<Resolver>,
    config: Arc<ServerConfig>,
}

impl TlsState {
    /// Loads `ssl.cert_file`/`ssl.key_file` and every `ssl.certificates` entry.
    pub fn new(ssl: &SslSection) -> Result<TlsState, TlsError> {
        let certs = Arc::new(Resolver(ArcSwap::from_pointee(Certs::load(ssl)?)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsState { certs, config: Arc::new(config) })
    }

    /// Re-reads the files `ssl` names; new handshakes get the new certificates, established
    /// connections keep theirs. On any error the current certificates stay.
    pub fn reload(&self, ssl: &SslSection) -> Result<(), TlsError> {
        let certs = Certs::load(ssl)?;
        self.certs.0.store(Arc::new(certs));
        tracing::info!(cert = %ssl.cert_file.display(), sni = ssl.certificates.len(), "TLS certificates reloaded");
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }
}

/// The certificates in use: a default and those picked by SNI (exact names, and `*.suffix`
/// wildcards stored by their suffix).
struct Certs {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl Certs {
    fn load(ssl: &SslSection) -> Result<Certs, TlsError> {
        let default = load_pair(&ssl.cert_file, &ssl.key_file)?;
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for c in &ssl.certificates {
            let key = load_pair(&c.cert_file, &c.key_file)?;
            let name = c.server_name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(suffix) => wildcard.insert(suffix.to_owned(), key),
                None => exact.insert(name, key),
            };
        }
        Ok(Certs { default, exact, wildcard })
    }

    fn for_name(&self, name: &str) -> &Arc<CertifiedKey> {
        let name = name.to_ascii_lowercase();
        self.exact
            .get(&name)
            .or_else(|| name.split_once('.').and_then(|(_, suffix)| self.wildcard.get(suffix)))
            .unwrap_or(&self.default)
    }
}

struct Resolver(ArcSwap<Certs>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.0.load();
        Some(hello.server_name().map_or(&certs.default, |n| certs.for_name(n)).clone())
    }
}

/// A certificate chain and its private key, checked to belong together.
fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let bad_pem = |path: &Path, e: pem::Error| TlsError::Pem { path: path.to_owned(), reason: format!("bad PEM: {e}") };
    let chain =
        CertificateDer::pem_slice_iter(&read(cert)?).collect::<Result<Vec<_>, _>>().map_err(|e| bad_pem(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::Pem { path: cert.to_owned(), reason: "no PEM certificate found".into() });
    }
    let der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Pem { path: key.to_owned(), reason: "no PEM private key found".into() },
        e => bad_pem(key, e),
    })?;
    let signer = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::Key { path: key.to_owned(), source })?;
    let pair = CertifiedKey::new(chain, signer);
    match pair.keys_match() {
        // A key type that cannot name its public key is let through, as rustls does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(Arc::new(pair)),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(TlsError::Mismatch { cert: cert.to_owned(), key: key.to_owned() })
        }
        Err(source) => Err(TlsError::Certificate { path: cert.to_owned(), source }),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// The protocol an upstream TLS connection offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    H2,
}

/// How to open TLS to one `https` backend: the name its certificate must carry (sent as SNI
/// when it is a DNS name) and whether the certificate is verified at all.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    server_name: ServerName<'static>,
    verify: bool,
}

impl UpstreamTls {
    /// The TLS settings of a backend, if its scheme is `https`; `ip` is its resolved address.
    pub fn for_backend(conf: &BackendSection, ip: IpAddr) -> Option<UpstreamTls> {
        (conf.scheme == Scheme::Https).then(|| UpstreamTls::new(&conf.host, ip, conf.tls_verify))
    }

    /// `host` as configured; `ip` (its resolved address) stands in when `host` is not a valid
    /// TLS name.
    pub fn new(host: &str, ip: IpAddr, verify: bool) -> UpstreamTls {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
            tracing::warn!(host, %ip, "backend host is not a TLS server name; verifying the certificate for its address");
            ServerName::IpAddress(ip.into())
        });
        UpstreamTls { server_name, verify }
    }

    /// Runs the TLS handshake on a connected socket.
    pub async fn connect(&self, tcp: TcpStream, alpn: Alpn) -> io::Result<TlsStream<TcpStream>> {
        TlsConnector::from(client_config(self.verify, alpn)).connect(self.server_name.clone(), tcp).await
    }
}

/// The four client configs (verify or not, h1 or h2), shared by every backend so their session
/// caches let reconnects resume.
fn client_config(verify: bool, alpn: Alpn) -> Arc<ClientConfig> {
    static CONFIGS: OnceLock<[Arc<ClientConfig>; 4]> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| {
        let make = |verify: bool, alpn: &[u8]| {
            let builder = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions");
            let mut config = if verify {
                let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                builder.with_root_certificates(roots).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCert(provider())))
                    .with_no_client_auth()
            };
            config.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(config)
        };
        [make(true, b"http/1.1"), make(true, b"h2"), make(false, b"http/1.1"), make(false, b"h2")]
    });
    configs[usize::from(!verify) * 2 + usize::from(alpn == Alpn::H2)].clone()
}

/// `tls_verify: false`: any certificate is accepted, but the handshake signatures are still
/// checked, so the peer must hold the key of the certificate it sent.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
