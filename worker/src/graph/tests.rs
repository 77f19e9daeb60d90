//! Unit tests of the classification table, header parsing, `appsecret_proof` and the URL
//! and secrecy rules. Tests against a live (fake) Graph are in `tests/tests/graph_client.rs`.

use super::*;
use FailureClass::*;
use lc_meta::pages::FirstMessage;
use lc_meta::secret::Secret;

fn c(code: i64, subcode: Option<i64>) -> FailureClass {
    classify(Some(400), Some(code), subcode)
}

#[test]
fn classification_without_a_graph_code() {
    assert_eq!(
        classify(None, None, None),
        Transient,
        "network error / timeout"
    );
    assert_eq!(classify(Some(500), None, None), Transient);
    assert_eq!(classify(Some(502), None, None), Transient);
    assert_eq!(classify(Some(503), None, None), Transient);
    assert_eq!(classify(Some(408), None, None), Transient);
    assert_eq!(classify(Some(429), None, None), RateLimited);
    assert_eq!(classify(Some(400), None, None), Unknown);
    assert_eq!(classify(Some(404), None, None), Unknown);
}

#[test]
fn classification_table_of_messenger_platform_6_4() {
    // Transient.
    assert_eq!(c(1, None), Transient, "1 unknown error");
    assert_eq!(c(1, Some(99)), Transient, "1/99");
    assert_eq!(
        c(1, Some(1357046)),
        FailureClass::OutcomeUnknown,
        "1/1357046 invalid JSON reply: may be sent"
    );
    assert_eq!(c(2, None), Transient, "2 unexpected error");
    assert_eq!(
        c(2, Some(2018344)),
        Permanent,
        "2/2018344 custom labels ToS"
    );
    assert_eq!(c(1200, None), Transient, "1200 temporary send failure");
    assert_eq!(c(2018321, None), Transient, "2018321 automated Q&A flow");
    // Rate limits.
    assert_eq!(c(4, None), RateLimited, "4 app request limit");
    assert_eq!(c(4, Some(2018022)), RateLimited, "4/2018022 phone sends");
    assert_eq!(
        c(4, Some(2018354)),
        Permanent,
        "4/2018354 marketing frequency"
    );
    assert_eq!(c(17, None), RateLimited, "17 user request limit");
    assert_eq!(c(32, None), RateLimited, "32 page request limit");
    assert_eq!(c(341, None), RateLimited, "341 app limit");
    assert_eq!(c(368, None), RateLimited, "368 temporarily blocked");
    assert_eq!(c(613, None), RateLimited, "613 rate limit");
    assert_eq!(c(613, Some(2534040)), RateLimited, "613/2534040");
    assert_eq!(c(613, Some(2018338)), Permanent, "613/2018338 tag abuse");
    assert_eq!(
        c(613, Some(1893016)),
        Permanent,
        "613/1893016 duplicate opt-in"
    );
    assert_eq!(c(80006, None), RateLimited, "80006 BUC limit");
    // Token.
    assert_eq!(c(190, None), TokenInvalid, "190 invalid token");
    assert_eq!(c(190, Some(463)), TokenInvalid, "190/463 expired");
    // Permanent.
    assert_eq!(c(10, None), Permanent, "10 permission");
    assert_eq!(c(10, Some(2018278)), Permanent, "10/2018278 outside window");
    assert_eq!(c(10, Some(2534022)), Permanent, "10/2534022 outside window");
    assert_eq!(c(10, Some(2018108)), Permanent, "10/2018108 can't receive");
    assert_eq!(
        c(10, Some(1893063)),
        Permanent,
        "10/1893063 page restricted"
    );
    assert_eq!(c(100, None), Permanent, "100 invalid parameter");
    assert_eq!(
        c(100, Some(2018001)),
        Permanent,
        "100/2018001 no matching user"
    );
    assert_eq!(c(200, None), Permanent, "200 permission");
    assert_eq!(c(200, Some(1545041)), Permanent, "200/1545041");
    assert_eq!(c(230, None), Permanent, "230 in 200..299");
    assert_eq!(c(299, None), Permanent, "299 in 200..299");
    assert_eq!(c(551, Some(1545041)), Permanent, "551 not receiving");
    assert_eq!(
        c(2018300, None),
        Permanent,
        "2018300 thread controlled by another app"
    );
    assert_eq!(c(2022, None), Permanent, "2022 commerce disabled");
    // Anything else.
    assert_eq!(c(9, Some(2018352)), Unknown, "9 not in the table");
    assert_eq!(c(300, None), Unknown, "300 just above 200..299");
    assert_eq!(c(123456, None), Unknown, "unknown code");
}

#[test]
fn code_wins_over_http_status() {
    assert_eq!(classify(Some(500), Some(100), None), Permanent);
    assert_eq!(classify(Some(200), Some(2), None), Transient);
    assert_eq!(classify(None, Some(190), None), TokenInvalid);
}

#[test]
fn retry_after_header_in_seconds() {
    assert_eq!(
        parse_retry_after(Some("30"), None),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        parse_retry_after(Some(" 7 "), None),
        Some(Duration::from_secs(7))
    );
    // It wins over the usage header.
    let usage = r#"{"1":[{"estimated_time_to_regain_access":5}]}"#;
    assert_eq!(
        parse_retry_after(Some("3"), Some(usage)),
        Some(Duration::from_secs(3))
    );
    // Malformed: ignored, falls back to the usage header.
    assert_eq!(
        parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), Some(usage)),
        Some(Duration::from_secs(300))
    );
    assert_eq!(parse_retry_after(Some("-1"), None), None);
    // Capped at 24 h.
    assert_eq!(
        parse_retry_after(Some("99999999999"), None),
        Some(Duration::from_secs(86_400))
    );
}

#[test]
fn retry_after_from_business_use_case_usage() {
    let usage = r#"{"1234":[{"type":"messenger","call_count":100,"total_cputime":10,
        "total_time":20,"estimated_time_to_regain_access":2},
        {"type":"pages","call_count":5,"estimated_time_to_regain_access":7}],
        "5678":[{"type":"messenger","estimated_time_to_regain_access":3}]}"#;
    assert_eq!(
        parse_retry_after(None, Some(usage)),
        Some(Duration::from_secs(7 * 60))
    );
    let zero =
        r#"{"1":[{"type":"messenger","call_count":95,"estimated_time_to_regain_access":0}]}"#;
    assert_eq!(parse_retry_after(None, Some(zero)), None);
    let string_minutes = r#"{"1":[{"estimated_time_to_regain_access":"4"}]}"#;
    assert_eq!(
        parse_retry_after(None, Some(string_minutes)),
        Some(Duration::from_secs(240))
    );
    let huge = r#"{"1":[{"estimated_time_to_regain_access":1e300}]}"#;
    assert_eq!(
        parse_retry_after(None, Some(huge)),
        Some(Duration::from_secs(86_400))
    );
}

#[test]
fn malformed_usage_headers_are_ignored() {
    for bad in [
        "",
        "not json",
        "[1,2]",
        r#"{"1":"x"}"#,
        r#"{"1":[{"estimated_time_to_regain_access":null}]}"#,
        r#"{"1":[{"estimated_time_to_regain_access":-3}]}"#,
        r#"{"1":[42]}"#,
    ] {
        assert_eq!(parse_retry_after(None, Some(bad)), None, "{bad}");
    }
    assert_eq!(parse_retry_after(None, None), None);
}

#[test]
fn appsecret_proof_is_hmac_sha256_of_the_token() {
    // Computed independently of `appsecret_proof`.
    let mut mac = Hmac::<Sha256>::new_from_slice(b"app_secret_x").expect("any key length");
    mac.update(b"token_y");
    let expected = hex::encode(mac.finalize().into_bytes());
    assert_eq!(appsecret_proof("app_secret_x", "token_y"), expected);
    assert_eq!(expected.len(), 64);
    assert_ne!(appsecret_proof("app_secret_x", "token_z"), expected);
}

fn page(app_secret: Option<&str>) -> PageConfig {
    PageConfig {
        id: "123".into(),
        access_token: Secret::new("tok-SECRET-123"),
        app_secret: app_secret.map(Secret::new),
        first_message: FirstMessage {
            text: "Hi".into(),
            quick_replies: vec![],
        },
    }
}

#[test]
fn urls_carry_proof_only_with_an_app_secret_and_never_the_token() {
    let client =
        GraphClient::new("https://graph.example/v25.0/", Duration::from_secs(5)).expect("client");
    assert_eq!(client.base_url(), "https://graph.example/v25.0");
    let plain = client.url(&page(None), &["123", "messages"], &[]);
    assert_eq!(plain.as_str(), "https://graph.example/v25.0/123/messages");
    let signed = client.url(
        &page(Some("shh")),
        &["123", "subscribed_apps"],
        &[("subscribed_fields", "messages,messaging_optins")],
    );
    let proof = appsecret_proof("shh", "tok-SECRET-123");
    assert_eq!(
        signed.as_str(),
        format!(
            "https://graph.example/v25.0/123/subscribed_apps?subscribed_fields=messages%2Cmessaging_optins&appsecret_proof={proof}"
        )
    );
    assert!(!signed.as_str().contains("tok-SECRET"));
    // Path segments are encoded, not interpreted.
    let odd = client.url(&page(None), &["1/../2", "messages"], &[]);
    assert_eq!(odd.path(), "/v25.0/1%2F..%2F2/messages");
}

#[test]
fn base_url_without_trailing_slash_is_the_same() {
    let a = GraphClient::new("https://graph.example/v25.0", Duration::from_secs(5)).expect("a");
    let b = GraphClient::new("https://graph.example/v25.0/", Duration::from_secs(5)).expect("b");
    assert_eq!(a.base_url(), b.base_url());
}

#[test]
fn bad_base_urls_are_rejected() {
    for bad in [
        "",
        "graph.facebook.com/v25.0",
        "ftp://x/v1",
        "https://x/v1?a=b",
        "mailto:a@b",
    ] {
        let e = GraphClient::new(bad, Duration::from_secs(1)).expect_err(bad);
        assert!(e.to_string().contains("GRAPH_API_URL"), "{e}");
    }
}

#[test]
fn debug_shows_no_secrets() {
    let client =
        GraphClient::new("https://graph.example/v25.0", Duration::from_secs(5)).expect("client");
    let d = format!("{client:?}");
    assert!(d.contains("graph.example"), "{d}");
    let p = page(Some("shh-secret"));
    let d = format!("{p:?}");
    assert!(
        !d.contains("tok-SECRET") && !d.contains("shh-secret"),
        "{d}"
    );
}

#[test]
fn scrub_removes_token_and_app_secret() {
    let p = page(Some("shh-secret"));
    let text = "Invalid OAuth access token: tok-SECRET-123 (proof for shh-secret)";
    assert_eq!(
        scrub(text, &p),
        "Invalid OAuth access token: [redacted] (proof for [redacted])"
    );
}

#[test]
fn failure_display_names_class_code_and_trace() {
    let f = GraphFailure {
        class: Permanent,
        http_status: Some(400),
        code: Some(10),
        subcode: Some(2018278),
        message: "(#10) This message is sent outside of allowed window.".into(),
        fbtrace_id: Some("AbC".into()),
        retry_after: None,
    };
    assert_eq!(
        f.to_string(),
        "Graph call failed (permanent, HTTP 400, code 10/2018278): (#10) This message is sent \
         outside of allowed window. [fbtrace_id AbC]"
    );
}

#[tokio::test]
async fn unreachable_graph_is_transient() {
    // Port 9 on localhost: nothing listens, the connection is refused at once.
    let client =
        GraphClient::new("http://127.0.0.1:9/v25.0", Duration::from_secs(2)).expect("client");
    match client
        .send_first_message(&page(None), "login-1", None)
        .await
    {
        SendOutcome::Failed(f) => {
            assert_eq!(f.class, Transient, "{f}");
            assert_eq!(f.http_status, None);
            assert!(!f.message.contains("tok-SECRET"), "{f}");
        }
        other => panic!("unexpected {other:?}"),
    }
}
