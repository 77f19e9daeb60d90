//! Hostile HTTP against ingest: oversized and slow requests, connection floods, bodies that
//! are not UTF-8 or nest absurdly deep, the largest batch Meta sends, and a verify token that
//! is almost right. Ingest must bound each of them and keep answering valid deliveries.
//!
//! Slow clients are written on raw TCP sockets, because an HTTP client library would not
//! send a request one byte at a time.

use std::time::{Duration, Instant};

use lc_ingest::RunningIngest;
use lc_meta::secret::Secret;
use lc_meta::signature::sign_sha256;
use lc_shared::shutdown::Shutdown;
use lc_shared::topology;
use lc_testkit::harness::{TestVhost, queue_depth, take_all};
use lc_testkit::pipeline::{ingest_config, start_ingest_with};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "abuse-app-secret";
const VERIFY_TOKEN: &str = "abuse-verify-token-0123456789";
/// Bound on reading one request (headers or body) in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

struct Ingest {
    vhost: TestVhost,
    running: RunningIngest,
    shutdown: Shutdown,
    http: reqwest::Client,
}

impl Ingest {
    async fn start() -> Self {
        let vhost = TestVhost::create();
        let mut config = ingest_config(vhost.url());
        config.app_secrets = vec![Secret::new(SECRET)];
        config.verify_token = Secret::new(VERIFY_TOKEN);
        config.confirm_timeout_ms = 5000;
        config.request_timeout_ms = u64::try_from(REQUEST_TIMEOUT.as_millis()).expect("ms");
        let (running, shutdown) = start_ingest_with(config).await;
        Self {
            vhost,
            running,
            shutdown,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.addr)
    }

    async fn post_signed(&self, body: &[u8]) -> u16 {
        self.http
            .post(self.url("/webhook"))
            .header("x-hub-signature-256", sign_sha256(SECRET, body))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("post")
            .status()
            .as_u16()
    }

    /// A valid one-opt-in delivery must get its 200 within a second, whatever else is going
    /// on. A fresh client each time: a pooled connection would hide a stalled accept loop.
    async fn assert_responsive(&self, what: &str) {
        let body = optins_body(1, &format!("responsive-{}", uuid::Uuid::new_v4().simple()));
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(1),
            reqwest::Client::new()
                .post(self.url("/webhook"))
                .header("x-hub-signature-256", sign_sha256(SECRET, &body))
                .header("content-type", "application/json")
                .body(body)
                .send(),
        )
        .await;
        match answer {
            Ok(Ok(r)) => assert_eq!(r.status(), 200, "{what}: valid delivery refused"),
            Ok(Err(e)) => panic!("{what}: valid delivery failed: {e}"),
            Err(_) => panic!(
                "{what}: valid delivery not answered within 1 s ({:?})",
                started.elapsed()
            ),
        }
    }

    async fn depth(&self, queue: &str) -> u32 {
        let conn = self.vhost.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        queue_depth(&ch, queue).await
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let result = tokio::time::timeout(Duration::from_secs(15), self.running.task)
            .await
            .expect("ingest drains within 15 s")
            .expect("join");
        assert!(result.is_ok(), "ingest stopped with {result:?}");
    }
}

/// A delivery of `n` opt-ins for one page.
fn optins_body(n: usize, prefix: &str) -> Vec<u8> {
    let items: Vec<_> = (0..n)
        .map(|i| {
            json!({"recipient": {"id": "1234567890"}, "timestamp": 1_700_000_000_000_i64 + i as i64,
                   "optin": {"login_id": format!("{prefix}-{i}")}})
        })
        .collect();
    serde_json::to_vec(&json!({"object": "page", "entry": [
        {"id": "1234567890", "time": 1_700_000_000_000_i64, "messaging": items}
    ]}))
    .expect("json")
}

/// Reads until the server answers or closes; returns what arrived (empty: closed without an
/// answer) or `None` if nothing happened within `within`.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return if got.is_empty() {
                    None
                } else {
                    Some(String::from_utf8_lossy(&got).into_owned())
                };
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    return Some(String::from_utf8_lossy(&got).into_owned());
                }
            }
        }
    }
}

/// Writes `bytes` one at a time, `gap` apart, until the peer stops accepting them or `for_at_most`
/// passes. Returns how long the server kept the connection usable.
async fn trickle(
    stream: &mut TcpStream,
    bytes: &[u8],
    gap: Duration,
    for_at_most: Duration,
) -> Duration {
    let started = Instant::now();
    for b in bytes.iter().cycle() {
        if started.elapsed() >= for_at_most || stream.write_all(&[*b]).await.is_err() {
            break;
        }
        // A closed connection shows up on the read side first (the write may still succeed
        // into the socket buffer).
        let mut probe = [0u8; 1024];
        match tokio::time::timeout(gap, stream.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => break, // an answer (e.g. 408) ends the request too
            Err(_) => {}
        }
    }
    started.elapsed()
}

#[tokio::test]
async fn a_huge_content_length_is_refused_with_413_before_the_body_arrives() {
    let ingest = Ingest::start().await;
    let mut stream = TcpStream::connect(ingest.running.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /webhook HTTP/1.1\r\nhost: ingest\r\ncontent-type: application/json\r\n\
         x-hub-signature-256: {}\r\ncontent-length: {}\r\n\r\n",
        sign_sha256(SECRET, b"{}"),
        100 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream
        .write_all(&[b' '; 1024])
        .await
        .expect("write a little body");
    let started = Instant::now();
    let answer = read_answer(&mut stream, Duration::from_secs(1)).await;
    let answer = answer.unwrap_or_else(|| {
        panic!("no answer within 1 s to a 100 MB Content-Length with 1 KB sent: ingest waits for a body it will refuse")
    });
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "expected a prompt 413, got after {:?}: {answer:?}",
        started.elapsed()
    );
    let metrics = ingest
        .http
        .get(format!("http://{}/metrics", ingest.running.admin_addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ingest_http_requests_total")
                && l.contains("status=\"413\"")
                && l.contains("POST /webhook")
                && l.ends_with(" 1")),
        "the early 413 is counted:\n{metrics}"
    );
    ingest
        .assert_responsive("after a 100 MB Content-Length")
        .await;
    assert_eq!(
        ingest.depth(topology::SCHEDULER_QUEUE).await,
        1,
        "only the valid delivery was stored"
    );
    ingest.stop().await;
}

#[tokio::test]
async fn slow_loris_headers_are_cut_off_after_the_request_timeout() {
    let ingest = Ingest::start().await;
    let mut stream = TcpStream::connect(ingest.running.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"POST /webhook HTTP/1.1\r\nhost: ingest\r\n")
        .await
        .expect("write start");
    // One header byte every 200 ms, never finishing the headers.
    let endless_header = b"x-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let held = tokio::spawn(async move {
        trickle(
            &mut stream,
            endless_header,
            Duration::from_millis(200),
            Duration::from_secs(15),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    ingest
        .assert_responsive("while a client trickles headers")
        .await;
    let held = held.await.expect("join");
    assert!(
        held < REQUEST_TIMEOUT + Duration::from_secs(3),
        "a client sending headers one byte at a time kept its connection for {held:?} (bound: {REQUEST_TIMEOUT:?})"
    );
    ingest
        .assert_responsive("after the slow client was cut off")
        .await;
    ingest.stop().await;
}

#[tokio::test]
async fn slow_loris_bodies_are_cut_off_after_the_request_timeout() {
    let ingest = Ingest::start().await;
    let body = optins_body(1, "slow-body");
    let mut stream = TcpStream::connect(ingest.running.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /webhook HTTP/1.1\r\nhost: ingest\r\ncontent-type: application/json\r\n\
         x-hub-signature-256: {}\r\ncontent-length: {}\r\n\r\n",
        sign_sha256(SECRET, &body),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    let held = tokio::spawn(async move {
        let held = trickle(
            &mut stream,
            &body,
            Duration::from_millis(200),
            Duration::from_secs(15),
        )
        .await;
        (held, stream)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    ingest
        .assert_responsive("while a client trickles a body")
        .await;
    let (held, _stream) = held.await.expect("join");
    assert!(
        held < REQUEST_TIMEOUT + Duration::from_secs(3),
        "a client sending its body one byte at a time kept the request for {held:?} (bound: {REQUEST_TIMEOUT:?})"
    );
    ingest
        .assert_responsive("after the slow body was cut off")
        .await;
    // The cut-off body was never acknowledged, so nothing of it may be stored.
    assert_eq!(
        ingest.depth(topology::SCHEDULER_QUEUE).await,
        2,
        "only the two valid deliveries"
    );
    ingest.stop().await;
}

/// How many idle connections to open: 2,000, or fewer if the process may not hold that many
/// sockets (each connection is two in this process: ours and ingest's).
fn idle_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .and_then(|n| n.parse::<usize>().ok())
                })
        })
        .unwrap_or(1024);
    2000.min(soft.saturating_sub(200) / 2)
}

#[tokio::test]
async fn thousands_of_idle_connections_do_not_starve_valid_deliveries() {
    let ingest = Ingest::start().await;
    let n = idle_connections();
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(
            TcpStream::connect(ingest.running.addr)
                .await
                .expect("connect"),
        );
    }
    for round in 0..5 {
        ingest
            .assert_responsive(&format!("with {n} idle connections open (round {round})"))
            .await;
    }
    // A few with a started but unfinished request, too.
    for s in idle.iter_mut().take(100) {
        let _ = s.write_all(b"POST /webhook HTTP/1.1\r\nhost: x\r\n").await;
    }
    ingest
        .assert_responsive("with half-written requests pending")
        .await;
    drop(idle);
    ingest.stop().await;
}

#[tokio::test]
async fn signed_invalid_utf8_is_refused_and_nothing_is_stored() {
    let ingest = Ingest::start().await;
    let mut body = br#"{"object":"page","entry":[{"id":"1","time":1,"messaging":[{"x":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, 0x80]);
    body.extend_from_slice(br#""}]}]}"#);
    // Not JSON, so not a webhook body whatever its signature (issue 14, item 4).
    assert_eq!(ingest.post_signed(&body).await, 400);
    assert_eq!(ingest.depth(topology::UNPARSED_QUEUE).await, 0);
    ingest.assert_responsive("after invalid UTF-8").await;
    ingest.stop().await;
}

#[tokio::test]
async fn signed_json_nested_ten_thousand_deep_is_bounded_and_ingest_survives() {
    let ingest = Ingest::start().await;
    let depth = 10_000;
    let deep_array = format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
    // Valid JSON but not an object: not a webhook body.
    assert_eq!(ingest.post_signed(&deep_array).await, 400);
    let deep_object = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)).into_bytes();
    assert_eq!(ingest.post_signed(&deep_object).await, 200);
    // Deep inside an item that is otherwise a valid delivery.
    let inner = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let deep_item = format!(
        r#"{{"object":"page","entry":[{{"id":"1234567890","time":1,"messaging":[{{"recipient":{{"id":"1234567890"}},"timestamp":1700000000000,"x":{inner}}}]}}]}}"#
    )
    .into_bytes();
    assert_eq!(ingest.post_signed(&deep_item).await, 200);
    let conn = ingest.vhost.connect().await;
    // The deep object is not a delivery: kept raw for inspection.
    let kept = take_all(&conn, topology::UNPARSED_QUEUE).await;
    assert_eq!(
        kept.len(),
        1,
        "the deep object is kept on {}",
        topology::UNPARSED_QUEUE
    );
    assert_eq!(kept[0].data, deep_object);
    // The parser never descends into an item it does not act on, so the deep item is an
    // `other` event like any unknown one, kept byte for byte.
    let other = take_all(&conn, topology::OTHER_QUEUE).await;
    assert_eq!(
        other.len(),
        1,
        "the deep item is kept on {}",
        topology::OTHER_QUEUE
    );
    assert!(String::from_utf8_lossy(&other[0].data).contains(&"{\"a\":".repeat(100)));
    ingest.assert_responsive("after 10,000-deep JSON").await;
    ingest.stop().await;
}

#[tokio::test]
async fn a_batch_of_a_thousand_events_is_stored_whole() {
    let ingest = Ingest::start().await;
    let body = optins_body(1000, "batch");
    assert_eq!(ingest.post_signed(&body).await, 200);
    assert_eq!(
        ingest.depth(topology::SCHEDULER_QUEUE).await,
        1000,
        "exactly one message per event"
    );
    for q in [
        topology::CORRELATOR_QUEUE,
        topology::OTHER_QUEUE,
        topology::UNPARSED_QUEUE,
    ] {
        assert_eq!(ingest.depth(q).await, 0, "{q}");
    }
    ingest.assert_responsive("after a 1000-event batch").await;
    ingest.stop().await;
}

#[tokio::test]
async fn every_single_byte_change_of_the_verify_token_is_refused() {
    let ingest = Ingest::start().await;
    let handshake = |token: String| {
        let http = ingest.http.clone();
        let url = ingest.url("/webhook");
        async move {
            let url = reqwest::Url::parse_with_params(
                &url,
                &[
                    ("hub.mode", "subscribe"),
                    ("hub.verify_token", token.as_str()),
                    ("hub.challenge", "c-42"),
                ],
            )
            .expect("url");
            let r = http.get(url).send().await.expect("get");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    assert_eq!(
        handshake(VERIFY_TOKEN.to_owned()).await,
        (200, "c-42".to_owned())
    );
    let bytes = VERIFY_TOKEN.as_bytes();
    for i in 0..bytes.len() {
        let mut changed = bytes.to_vec();
        changed[i] = if changed[i] == b'x' { b'y' } else { b'x' };
        let token = String::from_utf8(changed).expect("ascii");
        let (status, body) = handshake(token).await;
        assert_eq!(status, 403, "byte {i} changed was accepted");
        assert!(
            !body.contains("c-42"),
            "the challenge must not be echoed on refusal"
        );
    }
    for token in [
        &VERIFY_TOKEN[..VERIFY_TOKEN.len() - 1],
        &format!("{VERIFY_TOKEN}x"),
        "",
    ] {
        assert_eq!(handshake(token.to_owned()).await.0, 403, "{token:?}");
    }
    ingest.stop().await;
}

/// The text of ingest's `/metrics`, served on its admin listener only.
async fn admin_metrics(ingest: &Ingest) -> String {
    reqwest::get(format!("http://{}/metrics", ingest.running.admin_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Whether the server closes `stream` within `within` (EOF or reset), reading and dropping
/// whatever it answers first.
async fn closed_within(mut stream: TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4): all an h2c client sends before its
/// SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Issue 14, item 10: connections that send nothing, or only the HTTP/2 preface, are closed
/// once the request timeout has passed since they were accepted (the `auto` builder waited
/// for the protocol preface for ever and served h2c without any header or idle timeout), and
/// signed deliveries keep succeeding all along.
#[tokio::test]
async fn idle_and_h2_preface_connections_are_closed_after_the_timeout() {
    let ingest = Ingest::start().await;
    let n = idle_connections();
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(ingest.running.addr)
            .await
            .expect("connect");
        if i % 2 == 1 {
            s.write_all(H2_PREFACE).await.expect("preface");
        }
        idle.push(s);
    }
    let opened = Instant::now();
    let watchers: Vec<_> = idle
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, REQUEST_TIMEOUT + Duration::from_secs(4))))
        .collect();
    let mut round = 0;
    while opened.elapsed() < REQUEST_TIMEOUT + Duration::from_millis(500) {
        ingest
            .assert_responsive(&format!(
                "with {n} idle or h2c-preface connections (round {round})"
            ))
            .await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut still_open = 0;
    for w in watchers {
        if !w.await.expect("join") {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open,
        0,
        "{still_open} of {n} connections (idle or HTTP/2 preface only) were still open {:?} after they were opened",
        opened.elapsed()
    );
    ingest
        .assert_responsive("after the idle connections were closed")
        .await;
    ingest.stop().await;
}

/// Issue 14, item 10: beyond `INGEST_MAX_CONNECTIONS` open connections, a new connection is
/// answered `503` at once and closed (Meta retries), and counted; once connections close,
/// deliveries are taken again.
#[tokio::test]
async fn connections_beyond_the_cap_get_a_fast_503() {
    let vhost = TestVhost::create();
    let mut config = ingest_config(vhost.url());
    config.app_secrets = vec![Secret::new(SECRET)];
    config.max_connections = 20;
    let (running, shutdown) = start_ingest_with(config).await;
    let ingest = Ingest {
        vhost,
        running,
        shutdown,
        http: reqwest::Client::new(),
    };
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(
            TcpStream::connect(ingest.running.addr)
                .await
                .expect("connect"),
        );
    }
    lc_testkit::pipeline::eventually(
        Duration::from_secs(5),
        "the 20 idle connections accepted",
        || async {
            admin_metrics(&ingest)
                .await
                .contains("ingest_open_connections 20")
        },
    )
    .await;
    let mut extra = TcpStream::connect(ingest.running.addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let answer = read_answer(&mut extra, Duration::from_secs(1))
        .await
        .expect("an answer within a second");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        admin_metrics(&ingest)
            .await
            .contains("ingest_connections_shed_total 1"),
        "the shed connection is counted"
    );
    drop(idle);
    lc_testkit::pipeline::eventually(Duration::from_secs(5), "the slots free again", || async {
        admin_metrics(&ingest)
            .await
            .contains("ingest_open_connections 0")
    })
    .await;
    ingest
        .assert_responsive("after the idle connections left")
        .await;
    ingest.stop().await;
}

/// Issue 14, item 11: the method label of `ingest_http_requests_total` is a fixed set (any
/// extension method counts as `OTHER`), and `/metrics` is served on the admin listener only,
/// so the load balancer exposes nothing but the webhook paths.
#[tokio::test]
async fn metric_labels_are_bounded_and_metrics_live_on_the_admin_listener() {
    let ingest = Ingest::start().await;
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("BREW{i}").as_bytes()).expect("method");
        let status = ingest
            .http
            .request(method, ingest.url("/webhook"))
            .send()
            .await
            .expect("request")
            .status();
        assert_eq!(status.as_u16(), 405);
    }
    let main_port = ingest
        .http
        .get(ingest.url("/metrics"))
        .send()
        .await
        .expect("get");
    assert_eq!(
        main_port.status().as_u16(),
        404,
        "no /metrics on the webhook port"
    );
    let metrics = admin_metrics(&ingest).await;
    assert!(!metrics.contains("BREW"), "a label per method:\n{metrics}");
    assert!(
        metrics.contains("ingest_http_requests_total{route=\"OTHER /webhook\",status=\"405\"} 50"),
        "{metrics}"
    );
    ingest.stop().await;
}

/// Issue 14, item 10, with `INGEST_HTTP2=true`: h2c works (prior knowledge), and connections
/// that send nothing, only the preface, or finish their requests and then sit idle are all
/// closed once the request timeout has passed without a request in flight.
#[tokio::test]
async fn with_http2_on_idle_connections_are_closed_too() {
    let vhost = TestVhost::create();
    let mut config = ingest_config(vhost.url());
    config.app_secrets = vec![Secret::new(SECRET)];
    config.request_timeout_ms = u64::try_from(REQUEST_TIMEOUT.as_millis()).expect("ms");
    config.http2 = true;
    let (running, shutdown) = start_ingest_with(config).await;
    let ingest = Ingest {
        vhost,
        running,
        shutdown,
        http: reqwest::Client::new(),
    };
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let body = optins_body(1, "h2c");
    let answer = h2
        .post(ingest.url("/webhook"))
        .header("x-hub-signature-256", sign_sha256(SECRET, &body))
        .body(body)
        .send()
        .await
        .expect("h2c post");
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    assert_eq!(answer.status().as_u16(), 200);

    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(ingest.running.addr)
            .await
            .expect("connect");
        if i % 2 == 1 {
            s.write_all(H2_PREFACE).await.expect("preface");
        }
        idle.push(s);
    }
    let opened = Instant::now();
    let watchers: Vec<_> = idle
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, REQUEST_TIMEOUT + Duration::from_secs(4))))
        .collect();
    ingest.assert_responsive("with HTTP/2 on").await;
    let mut still_open = 0;
    for w in watchers {
        if !w.await.expect("join") {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open,
        0,
        "{still_open} of 200 connections still open {:?} after they were opened",
        opened.elapsed()
    );
    lc_testkit::pipeline::eventually(
        REQUEST_TIMEOUT + Duration::from_secs(4),
        "the h2c client's idle connection closed too",
        || async {
            admin_metrics(&ingest)
                .await
                .contains("ingest_open_connections 0")
        },
    )
    .await;
    assert_eq!(ingest.depth(topology::SCHEDULER_QUEUE).await, 2);
    ingest.stop().await;
}
