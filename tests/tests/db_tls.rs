//! PostgreSQL over TLS (`sslmode`, `sslrootcert`) against a private cluster with a TLS-only
//! listener and a certificate made at test time for `localhost`.

use std::path::PathBuf;

use lc_shared::db::{self, DbError};
use lc_testkit::private::{ClusterTls, PrivateCluster};
use lc_testkit::tls::TestCa;

/// A TLS-only PostgreSQL cluster whose certificate names `localhost` and is signed by `ca`;
/// `other_ca` signed nothing. Stopped and removed on drop.
struct TlsServer {
    cluster: PrivateCluster,
    dir: PathBuf,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
}

impl TlsServer {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lc-db-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = TestCa::new("loginconnect test CA");
        let other = TestCa::new("some other CA");
        let server = ca.issue(&["localhost"]);
        let tls = ClusterTls {
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            tls_only: true,
        };
        let cluster = PrivateCluster::start_with(&dir, Some(&tls)).expect("TLS cluster");
        let (ca_file, other_ca_file) = (dir.join("ca.pem"), dir.join("other-ca.pem"));
        ca.write_cert(&ca_file);
        other.write_cert(&other_ca_file);
        Self {
            cluster,
            dir,
            ca_file,
            other_ca_file,
        }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres?{params}",
            self.cluster.port
        )
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.cluster.stop(false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the pool's connection is encrypted, as the server sees it.
async fn encrypted(url: &str) -> Result<bool, DbError> {
    let pool = db::pool(url, 1)?;
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn every_mode_that_allows_tls_connects_encrypted_and_verify_full_checks_the_ca() {
    let server = TlsServer::start();
    let ca = server.ca_file.display().to_string();
    for params in [
        format!("sslmode=verify-full&sslrootcert={ca}"),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        "sslmode=require".to_owned(),
        // The default is `prefer`: encrypted when the server offers TLS.
        String::new(),
    ] {
        let url = server.url("localhost", &params);
        assert!(
            encrypted(&url)
                .await
                .unwrap_or_else(|e| panic!("{params}: {e}")),
            "{params}: not encrypted"
        );
    }
    // The first connection of a process (creating the database) goes the same way, and the
    // relay's LISTEN connection too.
    let url = server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    db::ensure_database(&url.replace("/postgres?", "/lc_tls_app?"))
        .await
        .expect("database created over verify-full");
    let target = db::Target::parse(&url).expect("target");
    target
        .connect()
        .await
        .expect("a plain connection over verify-full");
    // verify-ca accepts a certificate for another name (here: the IP address).
    let by_ip = server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    assert!(encrypted(&by_ip).await.expect("verify-ca by IP"));
}

#[tokio::test]
async fn a_wrong_ca_a_wrong_host_name_and_disable_against_tls_only_fail_with_the_mode_and_the_cause()
 {
    let server = TlsServer::start();
    let (ca, other) = (
        server.ca_file.display().to_string(),
        server.other_ca_file.display().to_string(),
    );
    let cases = [
        (
            server.url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            "sslmode=verify-full",
            "UnknownIssuer",
        ),
        (
            server.url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "sslmode=verify-full",
            "not valid for name",
        ),
        (
            server.url("localhost", "sslmode=disable"),
            "sslmode=disable",
            "accepts only TLS",
        ),
    ];
    for (url, mode, cause) in cases {
        let e = db::ensure_database(&url)
            .await
            .expect_err("the connection must fail");
        let text = e.to_string();
        assert!(
            text.contains(mode) && text.contains(cause),
            "{url}: the error must name {mode} and {cause}: {text}"
        );
        assert!(matches!(e, DbError::FirstConnect { .. }), "{text}");
        // Only a new setting helps: a worker's start must not wait for it.
        assert!(!e.is_transient(), "{text}");
    }
    // A CA file that does not exist is named before any connection.
    let missing = server.url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    let e = db::pool(&missing, 1).expect_err("no CA file");
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}
