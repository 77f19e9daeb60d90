//! AMQP over TLS (`amqps://`, `AMQP_TLS_CA_FILE`, `AMQP_TLS_CERT_FILE`, `AMQP_TLS_KEY_FILE`)
//! against a private RabbitMQ node with a TLS listener that verifies peers and requires a
//! client certificate, all certificates made at test time.

use std::path::PathBuf;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lc_shared::amqp::{self, AmqpEndpoint, AmqpError, BrokerLink, Outcome, TlsFiles};
use lc_shared::config::AmqpArgs;
use lc_testkit::private::{BrokerTls, PrivateBroker};
use lc_testkit::tls::TestCa;

/// A node whose TLS listener presents a certificate for 127.0.0.1 signed by `ca` and accepts
/// only clients with a certificate signed by `ca`; the files a client may be given are in
/// `dir`. Shut down and removed on drop.
struct TlsBroker {
    broker: PrivateBroker,
    dir: PathBuf,
    url: String,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
}

impl TlsBroker {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lc-amqp-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = TestCa::new("loginconnect test CA");
        let other = TestCa::new("some other CA");
        let server = ca.issue(&["localhost", "127.0.0.1"]);
        let tls = BrokerTls {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            require_client_cert: true,
        };
        let name = format!("lc-amqp-tls-{}", fastrand::u32(..));
        let broker = match PrivateBroker::start_with(&dir, &name, Some(&tls)).await {
            Ok(broker) => broker,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("TLS broker: {e:#}");
            }
        };
        let url = broker.amqps_url().expect("a TLS listener");
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let client = ca.issue(&["loginconnect-client"]);
        let stranger = other.issue(&["someone-else"]);
        Self {
            url,
            ca_file: file("ca.pem", &ca.cert_pem),
            other_ca_file: file("other-ca.pem", &other.cert_pem),
            client_cert: file("client.pem", &client.cert_pem),
            client_key: file("client.key", &client.key_pem),
            stranger_cert: file("stranger.pem", &stranger.cert_pem),
            stranger_key: file("stranger.key", &stranger.key_pem),
            broker,
            dir,
        }
    }

    /// The node with these settings, as a process would get them from the environment.
    fn endpoint(
        &self,
        ca: Option<&PathBuf>,
        cert_and_key: Option<(&PathBuf, &PathBuf)>,
    ) -> AmqpEndpoint {
        let mut args = AmqpArgs::new(self.url.clone());
        args.amqp_tls_ca_file = ca.cloned();
        args.amqp_tls_cert_file = cert_and_key.map(|(c, _)| c.clone());
        args.amqp_tls_key_file = cert_and_key.map(|(_, k)| k.clone());
        args.endpoint().expect("usable TLS settings")
    }

    /// The error of one connection attempt with these settings, as text.
    async fn failure(&self, endpoint: AmqpEndpoint) -> String {
        match amqp::connect(endpoint, "amqp-tls-test").await {
            Ok(_) => panic!("connected although it should not have"),
            Err(e @ AmqpError::Tls { .. }) => {
                eprintln!("{e}");
                e.to_string()
            }
            Err(e) => panic!("not reported as a TLS failure: {e}"),
        }
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        self.broker.stop(false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn the_ca_file_and_a_client_certificate_carry_a_message_both_ways() {
    let node = TlsBroker::start().await;
    let endpoint = node.endpoint(
        Some(&node.ca_file),
        Some((&node.client_cert, &node.client_key)),
    );

    // The supervised link (ingest's and the workers' path) publishes with a confirm…
    let link = BrokerLink::start(&endpoint, "amqp-tls-link", 1);
    link.wait_ready(Duration::from_secs(30))
        .await
        .expect("the link connects over TLS and declares the topology");
    let ch = link.open_channel().await.expect("channel");
    let queue = "amqp-tls-roundtrip";
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let mut lease = link.lease(Duration::from_secs(5)).await.expect("lease");
    lease
        .publish(
            "",
            queue,
            true,
            b"over tls",
            amqp::persistent_properties("m-1", "text/plain"),
        )
        .await
        .expect("publish");
    assert_eq!(
        lease.settle(Duration::from_secs(5)).await,
        vec![Outcome::Stored]
    );
    drop(lease);

    // …and a connection of its own (the CLI's path) reads it back.
    let conn = amqp::connect(&endpoint, "amqp-tls-reader")
        .await
        .expect("a second TLS connection");
    let reader = conn.create_channel().await.expect("channel");
    let got = reader
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the message is on the queue");
    assert_eq!(got.delivery.data, b"over tls");
    link.close().await;
}

#[tokio::test]
async fn tls_failures_name_the_cause_and_the_setting_to_fix() {
    let node = TlsBroker::start().await;
    let client = Some((&node.client_cert, &node.client_key));

    // A CA file that did not sign the broker's certificate.
    let text = node
        .failure(node.endpoint(Some(&node.other_ca_file), client))
        .await;
    assert!(
        text.contains("TLS") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "AMQP_TLS_CA_FILE ({})",
            node.other_ca_file.display()
        )),
        "{text}"
    );
    assert!(!text.contains("guest:guest"), "password in: {text}");

    // No CA file: the system's trust store does not know the test CA (lapin's own TLS path).
    let text = node.failure(node.endpoint(None, None)).await;
    assert!(
        text.contains("UnknownIssuer") && text.contains("set AMQP_TLS_CA_FILE"),
        "{text}"
    );

    // The right CA, but no client certificate for a broker that requires one. With TLS 1.3
    // the broker's alert or its reset of the connection may arrive first (timing): both name
    // the client certificate settings.
    let text = node.failure(node.endpoint(Some(&node.ca_file), None)).await;
    assert!(
        text.contains("requires a client certificate")
            && text.contains("AMQP_TLS_CERT_FILE and AMQP_TLS_KEY_FILE"),
        "{text}"
    );

    // A client certificate the broker's CA did not sign.
    let text = node
        .failure(node.endpoint(
            Some(&node.ca_file),
            Some((&node.stranger_cert, &node.stranger_key)),
        ))
        .await;
    assert!(
        text.contains("refused the client certificate")
            && text.contains(&node.stranger_cert.display().to_string()),
        "{text}"
    );

    // Settings that cannot work stop the start-up before any connection.
    let mut args = AmqpArgs::new(node.broker.amqp_base() + "/%2f");
    args.amqp_tls_ca_file = Some(node.ca_file.clone());
    let text = args
        .endpoint()
        .expect_err("plain amqp:// with TLS files")
        .to_string();
    assert!(text.contains("is not amqps://"), "{text}");
    let text = AmqpEndpoint::new(
        &node.url,
        TlsFiles {
            ca_file: Some(node.ca_file.clone()),
            cert_file: Some(node.client_key.clone()),
            key_file: Some(node.client_key.clone()),
        },
    )
    .expect_err("a key is no certificate")
    .to_string();
    assert!(text.contains("AMQP_TLS_CERT_FILE"), "{text}");
}
