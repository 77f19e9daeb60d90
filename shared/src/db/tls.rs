//! TLS to PostgreSQL: libpq's `sslmode` and `sslrootcert`, through rustls.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and never checks a
//! certificate itself: the connector decides. So the two settings are taken out of
//! `DATABASE_URL` here (tokio-postgres would refuse `verify-full` and any unknown option),
//! tokio-postgres is told whether to ask for TLS, and the rustls connector is built to check
//! what the mode promises:
//!
//! | mode | TLS | certificate checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `prefer` (default) | if the server offers it | no (yes with `sslrootcert`, as libpq) | no |
//! | `require` | always | no (yes with `sslrootcert`, as libpq) | no |
//! | `verify-ca` | always | against the CA | no |
//! | `verify-full` | always | against the CA | yes |
//!
//! The CA comes from `sslrootcert=<PEM file>` in the URL, else `PGSSLROOTCERT`; for the
//! `verify-*` modes without either (or with `sslrootcert=system`, libpq 16's spelling) the
//! operating system's roots are used, which is what managed services with public CAs need.
//! `PGSSLMODE` is honoured when the URL has no `sslmode`, as libpq does.
//!
//! The connector is `tokio-postgres-rustls` (rustls 0.23 with the aws-lc-rs provider that
//! lapin and reqwest already use: one TLS stack in every binary, no OpenSSL to install).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it (the default).
    Prefer,
    /// Always TLS, certificate not checked (unless a CA is given).
    Require,
    /// Always TLS, certificate checked against the CA, host name not.
    VerifyCa,
    /// Always TLS, certificate and host name checked.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// The operating system's trust store.
    System,
}

/// The TLS settings of one `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The mode.
    pub mode: SslMode,
    /// The CA, if one was given.
    pub root_cert: Option<RootCert>,
}

impl TlsSettings {
    /// A short description for error messages: the mode and the CA's source.
    pub fn describe(&self) -> String {
        match &self.root_cert {
            Some(RootCert::File(p)) => {
                format!(
                    "sslmode={}, sslrootcert={}",
                    self.mode.as_str(),
                    p.display()
                )
            }
            Some(RootCert::System) => format!("sslmode={}, system CAs", self.mode.as_str()),
            None => format!("sslmode={}", self.mode.as_str()),
        }
    }

    /// What tokio-postgres itself is told.
    pub fn postgres_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// Errors of the TLS settings (never of a connection: those come from tokio-postgres).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `sslmode` has a value libpq does not know.
    #[error("sslmode={0} is not a mode: use disable, prefer, require, verify-ca or verify-full")]
    BadMode(String),
    /// The CA file cannot be read or holds no certificate.
    #[error(
        "cannot use the CA file {path} ({mode}): {cause}; set sslrootcert in DATABASE_URL (or \
         PGSSLROOTCERT) to a readable PEM file of the server's CA"
    )]
    CaFile {
        /// The file.
        path: String,
        /// The mode that needed it.
        mode: &'static str,
        /// What went wrong.
        cause: String,
    },
    /// rustls refused the configuration.
    #[error("cannot set up TLS for PostgreSQL ({0})")]
    Config(String),
}

/// Takes `sslmode` and `sslrootcert` out of `url` (URL or key=value form) and returns the
/// rest with the settings they (or `PGSSLMODE`/`PGSSLROOTCERT`) ask for.
pub fn split(url: &str) -> Result<(String, TlsSettings), TlsError> {
    let (rest, mode, root) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url(url)
    } else {
        split_key_values(url)
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mode_text = mode.or_else(|| env("PGSSLMODE"));
    let mode = match mode_text {
        Some(m) => SslMode::parse(&m).ok_or(TlsError::BadMode(m))?,
        None => SslMode::Prefer,
    };
    let root_cert = root.or_else(|| env("PGSSLROOTCERT")).map(|r| {
        if r == "system" {
            RootCert::System
        } else {
            RootCert::File(PathBuf::from(r))
        }
    });
    // `sslrootcert=system` implies verify-full in libpq 16.
    let mode = match (&root_cert, mode) {
        (Some(RootCert::System), SslMode::Prefer | SslMode::Require) => SslMode::VerifyFull,
        (_, m) => m,
    };
    Ok((rest, TlsSettings { mode, root_cert }))
}

type Split = (String, Option<String>, Option<String>);

fn split_url(url: &str) -> Split {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None, None);
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || {
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned()
        };
        match key {
            "sslmode" => mode = Some(decoded()),
            "sslrootcert" => root = Some(decoded()),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, mode, root)
}

fn split_key_values(text: &str) -> Split {
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for token in text.split_whitespace() {
        match token.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.trim_matches('\'').to_owned()),
            Some(("sslrootcert", v)) => root = Some(v.trim_matches('\'').to_owned()),
            _ => kept.push(token),
        }
    }
    (kept.join(" "), mode, root)
}

/// The rustls connector that checks what `settings` promise (see the module doc).
pub fn connector(settings: &TlsSettings) -> Result<MakeRustlsConnect, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let roots = match (&settings.root_cert, settings.mode) {
        (_, SslMode::Disable) => None,
        (None, SslMode::Prefer | SslMode::Require) => None,
        (Some(RootCert::File(path)), mode) => Some(file_roots(path, mode)?),
        (Some(RootCert::System) | None, _) => Some(system_roots()?),
    };
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(NoCertificateCheck { algorithms }),
        Some(roots) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            if settings.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(IgnoreHostName { inner: webpki })
            }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn file_roots(path: &std::path::Path, mode: SslMode) -> Result<RootCertStore, TlsError> {
    let ca_error = |cause: String| TlsError::CaFile {
        path: path.display().to_string(),
        mode: mode.as_str(),
        cause,
    };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))?;
    for cert in certs {
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

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::Config(
            "no CA certificates in the system's trust store; set sslrootcert to the server's CA"
                .into(),
        ));
    }
    Ok(roots)
}

/// `prefer`/`require` without a CA: encryption without authentication, as libpq. The
/// handshake's signatures are still checked (the peer holds the certificate's key).
#[derive(Debug)]
struct NoCertificateCheck {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the name in the certificate may differ from
/// the host connected to (e.g. a replica reached by IP).
#[derive(Debug)]
struct IgnoreHostName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_settings_leave_the_url_and_the_rest_stays() {
        let (rest, s) = split(
            "postgres://u@db.example:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("split");
        assert_eq!(rest, "postgres://u@db.example:5432/app?application_name=x");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(RootCert::File("/etc/ca.pem".into())));
        let (rest, s) =
            split("host=a,b dbname=app sslmode=verify-ca sslrootcert=/ca.pem").expect("split");
        assert_eq!(rest, "host=a,b dbname=app");
        assert_eq!(s.mode, SslMode::VerifyCa);
        let (rest, s) = split("postgres://h/app?sslmode=require").expect("split");
        assert_eq!(rest, "postgres://h/app");
        assert_eq!(s.mode, SslMode::Require);
    }

    #[test]
    fn system_roots_imply_verify_full_and_bad_modes_are_named() {
        let (_, s) = split("postgres://h/app?sslrootcert=system").expect("split");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(RootCert::System));
        let e = split("postgres://h/app?sslmode=verify_full").expect_err("bad mode");
        assert!(e.to_string().contains("sslmode=verify_full"), "{e}");
    }

    #[test]
    fn a_missing_ca_file_is_named_with_the_mode() {
        let s = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(RootCert::File("/nonexistent/ca.pem".into())),
        };
        let e = connector(&s).err().expect("no file");
        let text = e.to_string();
        assert!(
            text.contains("/nonexistent/ca.pem") && text.contains("verify-full"),
            "{text}"
        );
    }
}
