//! AMQP over TLS (`amqps://`) with a CA file and a client certificate of our own choosing.
//!
//! Without any of the `AMQP_TLS_*` files, `amqps://` goes through lapin's own TLS set-up (the
//! system's trust store through rustls-platform-verifier), which is what a broker with a
//! certificate from a public CA needs. With a file, we build the rustls configuration
//! ourselves and hand lapin a connector that does TCP, then TLS with it: lapin's own route for
//! an extra CA (`OwnedTLSConfig::cert_chain`) passes it to the platform verifier as an "extra
//! root", and a broker certificate signed by exactly that CA still failed with `UnknownIssuer`
//! where `openssl s_client -CAfile` verified it. Our configuration trusts the CA file alone,
//! checked by rustls' own webpki verifier (aws-lc-rs provider, as everywhere here).
//!
//! The files are read again for every connection, so a renewed client certificate is picked
//! up at the next reconnection without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lapin::tcp::{AMQPUriTcpExt as _, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

/// The TLS files for `amqps://` (`AMQP_TLS_CA_FILE`, `AMQP_TLS_CERT_FILE`,
/// `AMQP_TLS_KEY_FILE`). None set: lapin's default TLS (system roots, no client certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file of the CA(s) that signed the broker's certificate; replaces the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (its chain may follow), for brokers that ask for one.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// A TLS setting that cannot be used; found at start-up, or when the files are read again.
#[derive(Debug, thiserror::Error)]
pub enum TlsSettingsError {
    /// The CA file cannot be read or holds no usable certificate.
    #[error(
        "cannot use AMQP_TLS_CA_FILE {path}: {cause} (it must be a PEM file of the CA that signed the broker's certificate)"
    )]
    CaFile {
        /// The file.
        path: String,
        /// What was wrong with it.
        cause: String,
    },
    /// The client certificate file cannot be read or holds no certificate.
    #[error(
        "cannot use AMQP_TLS_CERT_FILE {path}: {cause} (it must be a PEM file of the client certificate, its chain may follow)"
    )]
    CertFile {
        /// The file.
        path: String,
        /// What was wrong with it.
        cause: String,
    },
    /// The key file cannot be read, holds no key, or the key is not the certificate's.
    #[error(
        "cannot use AMQP_TLS_KEY_FILE {path}: {cause} (it must be the PEM private key of AMQP_TLS_CERT_FILE)"
    )]
    KeyFile {
        /// The file.
        path: String,
        /// What was wrong with it.
        cause: String,
    },
    /// Only one of the certificate and its key was given.
    #[error("AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE go together: set both or neither")]
    Unpaired,
    /// TLS files were given, but a node of `AMQP_URL` is plain `amqp://`.
    #[error(
        "AMQP_TLS_* files are set but the AMQP_URL node {url} is not amqps://: use amqps:// and the broker's TLS port (usually 5671), or unset the AMQP_TLS_* variables"
    )]
    NotAmqps {
        /// The node's URL without its password.
        url: String,
    },
    /// The system's trust store is empty (only asked for when a client certificate is given
    /// without a CA file).
    #[error(
        "no CA certificates in the system's trust store: set AMQP_TLS_CA_FILE to the broker's CA"
    )]
    NoSystemRoots,
    /// rustls refused the configuration.
    #[error("cannot set up TLS for RabbitMQ: {0}")]
    Config(String),
}

impl TlsFiles {
    /// True when no file is set (lapin's default TLS applies to `amqps://`).
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }

    /// Checks the settings against the nodes of `AMQP_URL` and reads the files once, so that
    /// a mistake stops the start-up instead of every connection attempt.
    pub fn validate(&self, nodes: &[&str]) -> Result<(), TlsSettingsError> {
        if self.is_empty() {
            return Ok(());
        }
        if let Some(plain) = nodes.iter().find(|n| !n.starts_with("amqps://")) {
            return Err(TlsSettingsError::NotAmqps {
                url: crate::config::redact_url(plain),
            });
        }
        self.client_config().map(drop)
    }

    /// The rustls configuration these files describe; `None` when no file is set.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsSettingsError> {
        if self.is_empty() {
            return Ok(None);
        }
        let roots = match &self.ca_file {
            Some(path) => file_roots(path)?,
            None => system_roots()?,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSettingsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_chain(cert)?;
                let key_error = |cause: String| TlsSettingsError::KeyFile {
                    path: key.display().to_string(),
                    cause,
                };
                let key_der =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| key_error(e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| key_error(e.to_string()))?
            }
            _ => return Err(TlsSettingsError::Unpaired),
        };
        Ok(Some(Arc::new(config)))
    }

    /// What a failure message says was in use.
    fn describe(&self) -> String {
        let ca = match &self.ca_file {
            Some(path) => format!("AMQP_TLS_CA_FILE={}", path.display()),
            None => "the system's trust store (no AMQP_TLS_CA_FILE)".to_owned(),
        };
        match &self.cert_file {
            Some(path) => format!("{ca}, AMQP_TLS_CERT_FILE={}", path.display()),
            None => format!("{ca}, no client certificate"),
        }
    }
}

fn file_roots(path: &Path) -> Result<RootCertStore, TlsSettingsError> {
    let ca_error = |cause: String| TlsSettingsError::CaFile {
        path: path.display().to_string(),
        cause,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))? {
        let cert = cert.map_err(|e| ca_error(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| ca_error(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ca_error("it holds no PEM certificate".into()));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsSettingsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsSettingsError::NoSystemRoots);
    }
    Ok(roots)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSettingsError> {
    let cert_error = |cause: String| TlsSettingsError::CertFile {
        path: path.display().to_string(),
        cause,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("it holds no PEM certificate".into()));
    }
    Ok(chain)
}

/// Connects to one node with `config`: TCP to the URL's host and port, then (for `amqps://`)
/// TLS through rustls-connector, lapin's own TLS crate, and the AMQP handshake on top.
pub(super) async fn connect(
    node: &str,
    config: Arc<ClientConfig>,
    props: ConnectionProperties,
) -> lapin::Result<Connection> {
    let uri: AMQPUri = node
        .parse()
        .map_err(|e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let runtime = lapin::runtime::default_runtime()?;
    let connector = RustlsConnector::from(config);
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let mut tcp = uri.clone();
            tcp.scheme = AMQPScheme::AMQP;
            let stream = tcp.connect_async(&runtime).await?;
            if uri.scheme != AMQPScheme::AMQPS {
                return Ok(stream);
            }
            Ok(stream.into_rustls(&connector, &uri.authority.host).await?)
        },
        props,
    )
    .await
}

/// When `error` (a failed connection) was caused by TLS: the cause and what to change.
pub(super) fn explain(
    error: &(dyn std::error::Error + 'static),
    files: &TlsFiles,
) -> Option<(String, String)> {
    let using = files.describe();
    let Some(tls) = rustls_error(error) else {
        return closed_after_handshake(error, files)
            .map(|(cause, fix)| (format!("{cause} (using {using})"), fix));
    };
    let fix = match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the host in AMQP_URL must be a name (or address) the broker's certificate lists"
            .to_owned(),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "the broker's certificate is outside its validity period (or this machine's clock is wrong)".to_owned(),
        rustls::Error::InvalidCertificate(_) => match &files.ca_file {
            Some(path) => format!(
                "the broker's certificate is not signed by the CA in AMQP_TLS_CA_FILE ({}): set it to the CA that signed the broker's certificate",
                path.display()
            ),
            None => "the broker's certificate is not signed by a CA this system trusts: set AMQP_TLS_CA_FILE to the CA that signed it".to_owned(),
        },
        rustls::Error::AlertReceived(alert) if client_certificate_alert(*alert) => {
            match &files.cert_file {
                None => "the broker requires a client certificate: set AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE".to_owned(),
                Some(path) => format!(
                    "the broker refused the client certificate AMQP_TLS_CERT_FILE ({}): it must be signed by a CA the broker trusts (its ssl_options.cacertfile) and not expired",
                    path.display()
                ),
            }
        }
        _ => "check that AMQP_URL names the broker's TLS port and the AMQP_TLS_* settings".to_owned(),
    };
    Some((format!("{tls} (using {using})"), fix))
}

/// A connection over our TLS settings that the broker closed without a TLS alert. With TLS
/// 1.3 the client finishes its side of the handshake before the broker has checked the client
/// certificate, so a broker that requires one it did not get (or does not accept) may reset
/// the connection instead of the alert reaching us first — which of the two the client sees
/// depends on timing. Named as a possible client-certificate problem, hedged, since a broker
/// that goes away in the middle of a connect looks the same.
fn closed_after_handshake(
    error: &(dyn std::error::Error + 'static),
    files: &TlsFiles,
) -> Option<(String, String)> {
    if files.ca_file.is_none() && files.cert_file.is_none() {
        return None;
    }
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::BrokenPipe
            )
        {
            let fix = match &files.cert_file {
                None => "if the broker requires a client certificate (ssl_options.fail_if_no_peer_cert), set AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE; otherwise check that the broker is running".to_owned(),
                Some(path) => format!(
                    "the broker may have refused the client certificate AMQP_TLS_CERT_FILE ({}): it must be signed by a CA the broker trusts (its ssl_options.cacertfile) and not expired; otherwise check that the broker is running",
                    path.display()
                ),
            };
            return Some((format!("the broker closed the TLS connection ({io})"), fix));
        }
        next = e.source();
    }
    None
}

/// The alerts a server sends when it does not accept (or did not get) a client certificate.
fn client_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure
    )
}

/// The rustls error somewhere in `error`'s chain. `std::io::Error` needs its inner error
/// looked at directly: its `source()` skips it and returns the inner error's own source.
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TLS 1.3: a broker that wants a client certificate may reset the connection before its
    /// alert is read (seen under load in the amqp_tls test); that reset must still name the
    /// client-certificate settings, not read as "is the broker running?".
    #[test]
    fn a_reset_after_the_handshake_names_the_client_certificate_settings() {
        let reset = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let no_cert = TlsFiles {
            ca_file: Some("/ca.pem".into()),
            ..TlsFiles::default()
        };
        let (cause, fix) = explain(&reset, &no_cert).expect("explained as TLS");
        assert!(cause.contains("closed the TLS connection"), "{cause}");
        assert!(
            fix.contains("requires a client certificate")
                && fix.contains("AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE"),
            "{fix}"
        );
        let with_cert = TlsFiles {
            cert_file: Some("/client.pem".into()),
            key_file: Some("/client.key".into()),
            ..no_cert
        };
        let (_, fix) = explain(&reset, &with_cert).expect("explained as TLS");
        assert!(
            fix.contains("refused the client certificate") && fix.contains("/client.pem"),
            "{fix}"
        );
        // Without TLS files (lapin's own TLS, or none) a reset stays a connection error.
        assert!(explain(&reset, &TlsFiles::default()).is_none());
    }

    #[test]
    fn unpaired_and_plain_nodes_and_missing_files_are_named() {
        let only_cert = TlsFiles {
            cert_file: Some("/c.pem".into()),
            ..TlsFiles::default()
        };
        assert!(matches!(
            only_cert.client_config(),
            Err(TlsSettingsError::Unpaired)
        ));
        let ca = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let text = ca
            .validate(&["amqps://u:secret@a:5671/%2f", "amqp://u:secret@b:5672/%2f"])
            .expect_err("plain node")
            .to_string();
        assert!(
            text.contains("amqp://u:***@b:5672") && !text.contains("secret"),
            "{text}"
        );
        let text = ca
            .validate(&["amqps://a:5671/%2f"])
            .expect_err("missing file")
            .to_string();
        assert!(
            text.contains("AMQP_TLS_CA_FILE /nonexistent/ca.pem"),
            "{text}"
        );
        assert!(TlsFiles::default().validate(&["amqp://a"]).is_ok());
    }

    #[test]
    fn a_rustls_error_is_found_inside_io_and_lapin_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let lapin = lapin::Error::from(io);
        let files = TlsFiles {
            ca_file: Some("/etc/ca.pem".into()),
            ..TlsFiles::default()
        };
        let (cause, fix) = explain(&lapin, &files).expect("a TLS error");
        assert!(cause.contains("UnknownIssuer"), "{cause}");
        assert!(fix.contains("AMQP_TLS_CA_FILE (/etc/ca.pem)"), "{fix}");
        let refused =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(explain(&refused, &files).is_none());
    }
}
