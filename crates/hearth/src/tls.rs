//! The API's transport security: what the server presents on the wire.
//!
//! By default the server keeps its own certificate authority in
//! `<data-dir>/tls/` (`ca.pem`, and `ca-key.pem` mode 0600), made on first
//! start, and on every start issues itself a fresh server certificate
//! (`server.pem`, `server-key.pem` mode 0600) for `localhost`, `127.0.0.1`,
//! `::1`, the listen address and every `--tls-san`. An operator may give
//! their own certificate chain and key instead (`--tls-cert`, `--tls-key`).
//! Plain HTTP is served only when asked (`--plain-http`) and only on a
//! loopback address.
//!
//! This module never accepts connections: `listener.rs` does, with the
//! [`rustls::ServerConfig`] made here.

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The TLS flags of `hearth server`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Serve plain HTTP instead of TLS: allowed only on a loopback listen
    /// address (local development, benchmarks).
    #[arg(long, env = "HEARTH_PLAIN_HTTP", conflicts_with_all = ["tls_cert", "tls_key", "tls_san"])]
    pub plain_http: bool,
    /// The operator's certificate chain (PEM, leaf first) instead of the
    /// server's own CA.
    #[arg(
        long,
        env = "HEARTH_TLS_CERT",
        requires = "tls_key",
        value_name = "PATH"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(
        long,
        env = "HEARTH_TLS_KEY",
        requires = "tls_cert",
        value_name = "PATH"
    )]
    pub tls_key: Option<PathBuf>,
    /// A further DNS name or IP address for the server's own certificate
    /// (repeatable; comma-separated in the variable).
    #[arg(
        long,
        env = "HEARTH_TLS_SAN",
        value_delimiter = ',',
        value_name = "NAME",
        conflicts_with = "tls_cert"
    )]
    pub tls_san: Vec<String>,
}

/// Folder of the data dir holding the server's own CA and certificate.
pub const TLS_DIR: &str = "tls";
/// The CA certificate clients trust (`.hearth/tls/ca.pem` for a local server).
pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server-key.pem";
/// The common name of the server's own CA, followed by a digest of its
/// public key: each CA has a name of its own (a client trusting two hearth
/// CAs tells them apart), and the name follows from the key, so the issuer
/// is rebuilt from the stored key alone on every start.
const CA_NAME: &str = "hearth server CA";

/// What the listener serves with, and what to tell the operator about it.
#[derive(Debug)]
pub struct Transport {
    /// `None`: plain HTTP (loopback only).
    pub config: Option<Arc<rustls::ServerConfig>>,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// The CA certificate file clients should trust (the server's own CA).
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the CA certificate (or of the operator's leaf), `AA:BB:…`.
    pub fingerprint: Option<String>,
}

/// Decides the transport for `listen`, making or loading what it needs.
pub fn setup(args: &TlsArgs, data_dir: &Path, listen: SocketAddr) -> anyhow::Result<Transport> {
    if args.plain_http {
        if !listen.ip().is_loopback() {
            bail!(
                "--plain-http serves the API unencrypted, which is allowed only on a loopback \
                 address; --listen {listen} is not one (drop --plain-http to serve TLS, or listen \
                 on 127.0.0.1)"
            );
        }
        return Ok(Transport {
            config: None,
            scheme: "http",
            ca_file: None,
            fingerprint: None,
        });
    }
    let (chain, key, ca_file, fingerprint) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = read_chain(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                anyhow::anyhow!("--tls-key {}: no PEM private key ({e})", key.display())
            })?;
            let fingerprint = fingerprint(&chain[0]);
            (chain, key, None, fingerprint)
        }
        _ => {
            let dir = data_dir.join(TLS_DIR);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let ca = own_ca(&dir)?;
            let (chain, key) = issue_server_cert(&dir, &ca, &sans(listen, &args.tls_san)?)?;
            let fingerprint = fingerprint(&ca.der);
            (chain, key, Some(dir.join(CA_FILE)), fingerprint)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not go together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Transport {
        config: Some(Arc::new(config)),
        scheme: "https",
        ca_file,
        fingerprint: Some(fingerprint),
    })
}

/// The certificates of a PEM file, leaf first; none is an error naming it.
fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", path.display()))?;
    if chain.is_empty() {
        bail!("--tls-cert {}: holds no PEM certificate", path.display());
    }
    Ok(chain)
}

/// `AA:BB:…`: the SHA-256 of a certificate, as `openssl x509 -fingerprint
/// -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A node's TLS in `dir` (`<node-data>/tls/` for `hearth node`,
/// `<data-dir>/node-tls/` for a server's embedded node, apart from the
/// server's own): its own CA (`node-ca.pem`, `node-ca-key.pem`) and a
/// fresh leaf for `names` (plus loopback) on every start. Returns the
/// config to serve with and the CA's PEM (what the node reports at join).
pub fn node_setup(
    dir: &Path,
    names: &[String],
) -> anyhow::Result<(Arc<rustls::ServerConfig>, String)> {
    let dir = dir.to_path_buf();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = own_ca_named(&dir, "node-ca.pem", "node-ca-key.pem", "hearth node CA")?;
    let mut sans = Vec::new();
    for name in ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(str::to_owned)
        .chain(names.iter().cloned())
    {
        let san = match name.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) if is_dns_name(&name) => rcgen::SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|e| anyhow::anyhow!("node name {name:?}: {e}"))?,
            ),
            Err(_) => bail!("{name:?}: neither an IP address nor a DNS name"),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let (chain, key) = issue_cert(&dir, &ca, &sans, "hearth node", "node.pem", "node-key.pem")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the node's TLS certificate and key do not go together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let ca_pem = fs::read_to_string(dir.join("node-ca.pem"))
        .with_context(|| format!("cannot read {}", dir.join("node-ca.pem").display()))?;
    Ok((Arc::new(config), ca_pem))
}

/// The server's own CA: its certificate (as an issuer) and key.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    /// `ca.pem` as clients have it (DER).
    der: Vec<u8>,
}

fn ca_params(key: &rcgen::KeyPair, ca_name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    let mut name = rcgen::DistinguishedName::new();
    let id = hex::encode(&Sha256::digest(key.public_key_raw())[..6]);
    name.push(rcgen::DnType::CommonName, format!("{ca_name} {id}"));
    name.push(rcgen::DnType::OrganizationName, "hearth");
    params.distinguished_name = name;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

/// Loads the CA of `dir`, or makes it (first start). `ca.pem` is what
/// clients trust, so it is written once and kept; the issuer used to sign
/// is rebuilt from the same name and the stored key, which is all a
/// verifier matches a server certificate against.
fn own_ca(dir: &Path) -> anyhow::Result<Ca> {
    own_ca_named(dir, CA_FILE, CA_KEY_FILE, CA_NAME)
}

fn own_ca_named(dir: &Path, cert_file: &str, key_file: &str, ca_name: &str) -> anyhow::Result<Ca> {
    let cert_path = dir.join(cert_file);
    let key_path = dir.join(key_file);
    if key_path.exists() {
        let pem = fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("{}: not a PEM private key", key_path.display()))?;
        if !cert_path.exists() {
            bail!(
                "{} exists without {}: restore it, or remove both to make a new CA (clients must then trust the new one)",
                key_path.display(),
                cert_path.display()
            );
        }
        let der = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?
            .to_vec();
        let cert = ca_params(&key, ca_name).self_signed(&key)?;
        return Ok(Ca { cert, key, der });
    }
    let key = rcgen::KeyPair::generate()?;
    let cert = ca_params(&key, ca_name).self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    tracing::info!(path = %cert_path.display(), name = ca_name, "made a certificate authority of its own");
    let der = cert.der().to_vec();
    Ok(Ca { cert, key, der })
}

/// The names the server certificate is valid for.
fn sans(listen: SocketAddr, extra: &[String]) -> anyhow::Result<Vec<rcgen::SanType>> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let ip = listen.ip();
    if ip.is_unspecified() {
        if let Ok(host) = nix::unistd::gethostname()
            && let Some(host) = host.to_str()
        {
            names.push(host.to_owned());
        }
    } else {
        names.push(ip.to_string());
    }
    names.extend(extra.iter().map(|s| s.trim().to_owned()));
    let mut sans = Vec::new();
    for name in names {
        if name.is_empty() {
            bail!("--tls-san: an empty name");
        }
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) if is_dns_name(&name) => rcgen::SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|e| anyhow::anyhow!("--tls-san {name:?}: {e}"))?,
            ),
            Err(_) => bail!("--tls-san {name:?}: neither an IP address nor a DNS name"),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// A DNS name a certificate can hold: dot-separated labels of letters,
/// digits and inner hyphens (1–63 bytes each, 253 in all), the first maybe `*`.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (i == 0 && label == "*")
                || (!label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        })
}

/// Issues (and writes) a fresh server certificate signed by `ca`.
fn issue_server_cert(
    dir: &Path,
    ca: &Ca,
    sans: &[rcgen::SanType],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    issue_cert(
        dir,
        ca,
        sans,
        "hearth server",
        SERVER_CERT_FILE,
        SERVER_KEY_FILE,
    )
}

fn issue_cert(
    dir: &Path,
    ca: &Ca,
    sans: &[rcgen::SanType],
    common_name: &str,
    cert_file: &str,
    key_file: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let mut params = rcgen::CertificateParams::default();
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.subject_alt_names = sans.to_vec();
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(825);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    write_file(&dir.join(key_file), &key.serialize_pem(), 0o600)?;
    write_file(
        &dir.join(cert_file),
        &format!("{}{}", cert.pem(), ca.cert.pem()),
        0o644,
    )?;
    let key = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the server key: {e}"))?;
    Ok((vec![cert.der().clone()], key))
}

/// Writes `text` to `path` with `mode` (tightened on an existing file).
fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    if path.exists() {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen() -> SocketAddr {
        "127.0.0.1:7070".parse().unwrap()
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let args = TlsArgs {
            plain_http: true,
            ..Default::default()
        };
        let err = setup(&args, dir.path(), "0.0.0.0:7070".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("--listen 0.0.0.0:7070 is not one"),
            "{err}"
        );
        let t = setup(&args, dir.path(), listen()).unwrap();
        assert_eq!((t.scheme, t.config.is_none()), ("http", true));
        assert!(!dir.path().join(TLS_DIR).exists(), "plain HTTP makes no CA");
    }

    #[test]
    fn the_ca_is_made_once_and_kept_with_its_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = setup(&TlsArgs::default(), dir.path(), listen()).unwrap();
        let tls = dir.path().join(TLS_DIR);
        let ca = fs::read(tls.join(CA_FILE)).unwrap();
        for (file, mode) in [
            (CA_KEY_FILE, 0o600),
            (SERVER_KEY_FILE, 0o600),
            (CA_FILE, 0o644),
        ] {
            let m = fs::metadata(tls.join(file)).unwrap().permissions().mode();
            assert_eq!(m & 0o777, mode, "{file}");
        }
        let second = setup(&TlsArgs::default(), dir.path(), listen()).unwrap();
        assert_eq!(fs::read(tls.join(CA_FILE)).unwrap(), ca, "the CA is kept");
        assert_eq!(first.fingerprint, second.fingerprint);
    }

    #[test]
    fn a_bad_san_is_named() {
        let err = sans(listen(), &["bad name!".into()]).unwrap_err();
        assert!(err.to_string().contains("\"bad name!\""), "{err}");
        let s = sans(listen(), &["hearth.example".into(), "10.1.2.3".into()]).unwrap();
        assert!(s.contains(&rcgen::SanType::IpAddress("10.1.2.3".parse().unwrap())));
    }
}
