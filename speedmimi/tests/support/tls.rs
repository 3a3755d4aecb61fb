//! TLS test support: a test certificate authority issuing leaf certificates, a temp dir to write
//! them into, and HTTP/1.1-over-TLS clients that trust only the test CA.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::{
    ClientConfig, RootCertStore,
    client::Resumption,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

const WAIT: Duration = Duration::from_secs(10);

/// A directory of its own under the system temp dir (process id plus a counter), removed when
/// dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("speedmimi-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// Writes `name` whole: a reader sees the old or the new contents, never a mix.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test certificate authority; the test clients trust only it.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// An issued certificate with its key, as PEM and DER.
pub struct Leaf {
    pub pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "SpeedMimi test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn issue(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }
}

impl Leaf {
    /// Writes `<name>.crt` and `<name>.key`.
    pub fn write(&self, dir: &TempDir, name: &str) -> (PathBuf, PathBuf) {
        (dir.write(&format!("{name}.crt"), &self.pem), dir.write(&format!("{name}.key"), &self.key_pem))
    }
}

/// The `ssl:` section (`port` adds a separate HTTPS listener) plus `extra` lines in it.
pub fn ssl_yaml(cert: &Path, key: &Path, port: bool, extra: &str) -> String {
    let port = if port { "  port: 8443\n" } else { "" };
    format!(
        "ssl:\n  enabled: true\n  cert_file: \"{}\"\n  key_file: \"{}\"\n{port}{extra}",
        cert.display(),
        key.display()
    )
}

pub fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `ca` only, offering `alpn`, never resuming (each handshake shows the
/// certificate served now).
pub fn connector(ca: &Ca, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` for server name `name` through [`connector`].
pub async fn tls_connect(addr: SocketAddr, ca: &Ca, name: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(WAIT, connector(ca, alpn).connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("handshake")
}

/// The certificate the server presented.
pub fn peer_cert(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().expect("server sent a certificate")[0].clone().into_owned()
}

/// An HTTP/1.1 client on `stream`.
pub async fn h1(stream: TlsStream<TcpStream>) -> http1::SendRequest<Empty<Bytes>> {
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// GET `path` on an HTTP/1.1 connection: status and body.
pub async fn send(sender: &mut http1::SendRequest<Empty<Bytes>>, path: &str) -> (StatusCode, String) {
    tokio::time::timeout(WAIT, sender.ready()).await.expect("connection not ready").expect("connection closed");
    let req = Request::get(path).header(header::HOST, "localhost").body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.expect("response timed out").unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
