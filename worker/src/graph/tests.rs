//! Unit tests of the classification table, header parsing (`Retry-After`, usage headers),
//! the slow-down policy, `appsecret_proof` and the URL and secrecy rules, plus a few calls
//! against a one-answer local HTTP server for what only a real answer shows (headers read on
//! successes and failures). Tests against the full fake Graph are in
//! `tests/tests/graph_client.rs`.

use super::usage::*;
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
        "no response, never sent (`call` decides timeouts itself)"
    );
    // A 408: the server gave up waiting for the request, so it was not processed.
    assert_eq!(classify(Some(408), None, None), Transient);
    assert_eq!(classify(Some(429), None, None), RateLimited);
    assert_eq!(classify(Some(400), None, None), Unknown);
    assert_eq!(classify(Some(404), None, None), Unknown);
}

/// Failed before the change: a bare 5xx was `Transient`, so a gateway's 502/504 after Graph
/// had sent the message led to a retry and a second message.
#[test]
fn a_5xx_without_a_graph_error_body_has_an_unknown_outcome() {
    for status in [500, 502, 503, 504, 599] {
        assert_eq!(
            classify(Some(status), None, None),
            FailureClass::OutcomeUnknown,
            "HTTP {status}"
        );
    }
    // With a Graph error body, the code decides as before.
    assert_eq!(classify(Some(500), Some(2), None), Transient);
    assert_eq!(classify(Some(503), Some(1200), None), Transient);
    assert_eq!(classify(Some(502), Some(100), None), Permanent);
}

/// Failed before the change: codes 1, 4 and 10/1893063 had the labels `transient`,
/// `rate_limited` and `permanent`. (Written with labels, not variants, so that it ran
/// against the old code; the labels are metric label values and must stay as they are.)
#[test]
fn new_classes_and_their_labels() {
    assert_eq!(c(1, None).as_str(), "transient_once");
    assert_eq!(c(1, Some(99)).as_str(), "transient_once");
    assert_eq!(c(4, None).as_str(), "app_throttled");
    assert_eq!(c(4, Some(2018022)).as_str(), "rate_limited");
    assert_eq!(c(10, Some(1893063)).as_str(), "page_restricted");
}

#[test]
fn every_class_is_listed_once_with_a_distinct_label() {
    // Exhaustive: a new variant breaks this match, a reminder to extend `ALL`.
    fn listed(class: FailureClass) -> bool {
        match class {
            Transient
            | TransientOnce
            | RateLimited
            | AppThrottled
            | PageRestricted
            | Permanent
            | TokenInvalid
            | Unknown
            | FailureClass::OutcomeUnknown => FailureClass::ALL.contains(&class),
        }
    }
    assert!(FailureClass::ALL.iter().all(|c| listed(*c)));
    let mut labels: Vec<&str> = FailureClass::ALL.iter().map(|c| c.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), FailureClass::ALL.len(), "{labels:?}");
    assert!(
        labels
            .iter()
            .all(|l| l.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'))
    );
    for class in FailureClass::ALL {
        assert_eq!(class.to_string(), class.as_str());
    }
}

#[test]
fn only_code_1_bounds_its_own_attempts() {
    assert_eq!(
        TransientOnce.attempt_limit(),
        Some(2),
        "the try and one retry"
    );
    for class in FailureClass::ALL {
        if class != TransientOnce {
            assert_eq!(class.attempt_limit(), None, "{class}");
        }
    }
}

#[test]
fn classification_table_of_messenger_platform_6_4() {
    // Transient.
    assert_eq!(c(1, None), TransientOnce, "1 unknown error: retry once");
    assert_eq!(c(1, Some(99)), TransientOnce, "1/99");
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
    assert_eq!(c(4, None), AppThrottled, "4 app request limit");
    assert_eq!(
        c(4, Some(12345)),
        AppThrottled,
        "4/other: still the app's limit"
    );
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
        PageRestricted,
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
    assert_eq!(classify(Some(502), Some(1), None), TransientOnce);
    assert_eq!(classify(Some(429), Some(4), None), AppThrottled);
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
    for bad in ["soon", "1.5", "-1", "", "0x10", "Wed, 21 Oct 2015"] {
        assert_eq!(
            parse_retry_after(Some(bad), Some(usage)),
            Some(Duration::from_secs(300)),
            "{bad:?}"
        );
        assert_eq!(parse_retry_after(Some(bad), None), None, "{bad:?}");
    }
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
            variants: vec![],
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
        usage: None,
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

/// `2015-10-21 07:28:00 UTC`, the date of RFC 9110's example.
fn rfc_example_time() -> OffsetDateTime {
    time::macros::datetime!(2015-10-21 07:28:00 UTC)
}

/// Failed before the change: an HTTP date was ignored (`None`).
#[test]
fn retry_after_as_an_http_date_in_the_past_is_no_wait() {
    assert_eq!(
        parse_retry_after(Some("Thu, 01 Jan 1970 00:00:00 GMT"), None),
        Some(Duration::ZERO)
    );
    // A valid date wins over the usage header, like whole seconds do.
    let usage = r#"{"1":[{"estimated_time_to_regain_access":5}]}"#;
    assert_eq!(
        parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), Some(usage)),
        Some(Duration::ZERO)
    );
}

#[test]
fn retry_after_as_an_http_date() {
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    let at = rfc_example_time();
    let ask = |value: &str, now: OffsetDateTime| parse_retry_after_header(value, now);
    assert_eq!(
        ask(date, at - time::Duration::seconds(90)),
        Some(Duration::from_secs(90))
    );
    assert_eq!(ask(date, at), Some(Duration::ZERO), "now");
    assert_eq!(
        ask(date, at + time::Duration::days(400)),
        Some(Duration::ZERO),
        "in the past"
    );
    assert_eq!(
        ask(date, at - time::Duration::days(3)),
        Some(Duration::from_secs(86_400)),
        "capped at 24 h"
    );
    // Fractions of a second of `now` are kept, not rounded into a longer wait.
    assert_eq!(
        ask(date, at - time::Duration::milliseconds(1500)),
        Some(Duration::from_millis(1500))
    );
    // Liberal where it costs nothing: spacing around the value, the month's case, the
    // weekday (not checked against the date).
    let soon = at - time::Duration::seconds(10);
    for ok in [
        "  Wed, 21 Oct 2015 07:28:00 GMT ",
        "Wed, 21 OCT 2015 07:28:00 GMT",
        "Mon, 21 oct 2015 07:28:00 GMT",
    ] {
        assert_eq!(ask(ok, soon), Some(Duration::from_secs(10)), "{ok:?}");
    }
    assert_eq!(ask("120", soon), Some(Duration::from_secs(120)));
    for bad in [
        "",
        "Wed,",
        "Wed, ",
        "Wed, 21 Oct 2015 07:28:00",
        "Wed, 21 Oct 2015 07:28:00 UTC",
        "Wed, 21 Oct 2015 07:28:00 +0000",
        "21 Oct 2015 07:28:00 GMT",
        "Wed, 32 Oct 2015 07:28:00 GMT",
        "Wed, 21 Foo 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015 25:28:00 GMT",
        "Wed, 21 Oct 2015 07:28:00 GMT trailing",
        // The obsolete forms (RFC 850, asctime) are not accepted.
        "Wednesday, 21-Oct-15 07:28:00 GMT",
        "Wed Oct 21 07:28:00 2015",
        "-5",
        "1e3",
        "Wed, 21 Oct 99999999999 07:28:00 GMT",
    ] {
        assert_eq!(ask(bad, soon), None, "{bad:?}");
    }
}

#[test]
fn usage_from_each_header_shape() {
    let app = r#"{"call_count":28,"total_time":25,"total_cputime":25}"#;
    let page = r#"{"call_count":"81","total_cputime":3,"total_time":4}"#;
    let buc = r#"{"1234":[{"type":"messenger","call_count":12,"total_cputime":96.5,
        "total_time":20,"estimated_time_to_regain_access":0}],
        "5678":[{"type":"pages","call_count":3,"total_time":"2"}]}"#;
    assert_eq!(
        parse_usage([app]),
        Some(Usage {
            percent: 28.0,
            regain_after: None
        })
    );
    assert_eq!(parse_usage([page]).map(|u| u.percent), Some(81.0));
    assert_eq!(parse_usage([buc]).map(|u| u.percent), Some(96.5));
    // All together: the largest value of all, whichever header it is in.
    assert_eq!(
        parse_usage([app, page, buc]),
        Some(Usage {
            percent: 96.5,
            regain_after: None
        })
    );
    // A regain time in any header; the largest wins; capped at 24 h.
    let blocked = r#"{"1":[{"call_count":100,"estimated_time_to_regain_access":7}],
        "2":[{"estimated_time_to_regain_access":"3"}]}"#;
    assert_eq!(
        parse_usage([app, blocked]),
        Some(Usage {
            percent: 100.0,
            regain_after: Some(Duration::from_secs(7 * 60))
        })
    );
    let page_regain = r#"{"call_count":100,"estimated_time_to_regain_access":1e300}"#;
    assert_eq!(
        parse_usage([page_regain]).and_then(|u| u.regain_after),
        Some(Duration::from_secs(86_400))
    );
    // Only a regain time: the usage is known to be blocking, the percentage is not.
    assert_eq!(
        parse_usage([r#"{"x":[{"estimated_time_to_regain_access":2}]}"#]),
        Some(Usage {
            percent: 0.0,
            regain_after: Some(Duration::from_secs(120))
        })
    );
    // Above 100 is kept as is.
    assert_eq!(
        parse_usage([r#"{"call_count":250}"#]).map(|u| u.percent),
        Some(250.0)
    );
}

#[test]
fn no_usable_usage_header_is_no_usage() {
    assert_eq!(parse_usage(std::iter::empty::<&str>()), None);
    for bad in [
        "",
        " ",
        "not json",
        "null",
        "42",
        "\"call_count\"",
        "[1,2]",
        "{}",
        r#"{"1":"x"}"#,
        r#"{"1":[42]}"#,
        r#"{"call_count":null}"#,
        r#"{"call_count":-3}"#,
        r#"{"call_count":"-3"}"#,
        r#"{"call_count":"NaN","total_time":"inf","total_cputime":"-inf"}"#,
        r#"{"call_count":true,"total_time":[],"total_cputime":{}}"#,
        r#"{"call_count":"12%"}"#,
        r#"{"call_count":1e999}"#,
        r#"{"other":5,"type":"messenger"}"#,
        r#"{"call_count":28"#,
        r#"{"1":[{"estimated_time_to_regain_access":0}]}"#,
    ] {
        assert_eq!(parse_usage([bad]), None, "{bad:?}");
    }
    // Garbage next to a good header does not spoil it.
    assert_eq!(
        parse_usage(["garbage", r#"{"call_count":5}"#, "{]"]).map(|u| u.percent),
        Some(5.0)
    );
    // Bytes: invalid UTF-8 is garbage; valid UTF-8 beyond ASCII is read.
    let non_ascii = r#"{"1":[{"name":"Café","call_count":9}]}"#.as_bytes();
    let invalid: &[u8] = b"{\"call_count\":\xff}";
    assert_eq!(
        parse_usage([non_ascii, invalid]).map(|u| u.percent),
        Some(9.0)
    );
}

#[test]
fn hostile_usage_headers_never_panic() {
    // Deep nesting: serde_json refuses past its recursion limit; below it, the walk stops
    // at its own depth limit.
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    for n in [1, 5, 100, 127, 128, 129, 10_000] {
        assert_eq!(parse_usage([deep(n).as_str()]), None, "depth {n}");
    }
    let deep_usage = format!(
        "{}{{\"call_count\":99}}{}",
        "[".repeat(100),
        "]".repeat(100)
    );
    assert_eq!(
        parse_usage([deep_usage.as_str()]),
        None,
        "too deep to count"
    );
    let shallow = r#"[[[{"a":{"b":[{"call_count":12}]}}]]]"#;
    assert_eq!(parse_usage([shallow]).map(|u| u.percent), Some(12.0));
    // Random garbage made of JSON's own characters and the keys: only finite, non-negative
    // numbers come out.
    let pieces = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "call_count",
        "\"call_count\"",
        "1e308",
        "-1",
        "\"7\"",
        "0.5",
        "null",
        "\"estimated_time_to_regain_access\"",
        "1e-400",
        " ",
        "\\",
    ];
    let mut rng = fastrand::Rng::with_seed(13);
    for _ in 0..20_000 {
        let len = rng.usize(0..40);
        let text: String = (0..len)
            .map(|_| pieces[rng.usize(..pieces.len())])
            .collect();
        if let Some(u) = parse_usage([text.as_str()]) {
            assert!(u.percent.is_finite() && u.percent >= 0.0, "{text}: {u:?}");
            assert!(
                u.regain_after
                    .is_none_or(|d| d > Duration::ZERO && d <= Duration::from_secs(86_400)),
                "{text}: {u:?}"
            );
        }
    }
}

#[test]
fn slow_down_before_the_limit() {
    let f = slow_down_factor;
    assert_eq!(f(0.0), 1.0);
    assert_eq!(f(74.9), 1.0);
    assert_eq!(f(75.0), 1.0);
    assert!((f(85.0) - 0.55).abs() < 1e-9, "{}", f(85.0));
    assert!((f(95.0) - 0.1).abs() < 1e-9);
    assert_eq!(f(99.99), 0.1);
    assert_eq!(f(100.0), 0.0);
    assert_eq!(f(250.0), 0.0);
    assert_eq!(f(f64::INFINITY), 0.0);
    // No information: full speed, as without a header.
    assert_eq!(f(f64::NAN), 1.0);
    assert_eq!(f(-5.0), 1.0);
    assert_eq!(f(f64::NEG_INFINITY), 1.0);
    // Never more than full speed or less than nothing, and never faster at a higher usage.
    let mut last = 1.0;
    for tenth in 0..=1_200 {
        let factor = f(f64::from(tenth) / 10.0);
        assert!((0.0..=1.0).contains(&factor), "{tenth}: {factor}");
        assert!(factor <= last, "{tenth}: {factor} > {last}");
        last = factor;
    }
}

#[test]
fn a_regain_time_means_no_calls_at_all() {
    let usage = |percent, regain_after| Usage {
        percent,
        regain_after,
    };
    assert_eq!(usage(10.0, None).rate_factor(), 1.0);
    assert!((usage(85.0, None).rate_factor() - 0.55).abs() < 1e-9);
    assert_eq!(usage(100.0, None).rate_factor(), 0.0);
    assert_eq!(
        usage(10.0, Some(Duration::from_secs(60))).rate_factor(),
        0.0
    );
}

/// A local HTTP server answering every request with `answer` (a full HTTP/1.1 response),
/// and the Graph base URL to reach it.
async fn one_answer_server(answer: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                // Read the request head and its body (Content-Length), then answer.
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v25.0")
}

/// An HTTP/1.1 response with `headers` (`Name: value` lines) and `body`.
fn http_answer(status: &str, headers: &[&str], body: &str) -> String {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out
}

async fn send_to(answer: String) -> SendOutcome {
    let base = one_answer_server(answer).await;
    let client = GraphClient::new(&base, Duration::from_secs(5)).expect("client");
    client
        .send_first_message(&page(None), "login-1", None)
        .await
}

/// Failed before the change (as `Transient`): what `call` does with a gateway's bare 502.
#[tokio::test]
async fn a_gateway_502_after_sending_has_an_unknown_outcome() {
    let answer = http_answer(
        "502 Bad Gateway",
        &["content-type: text/html"],
        "<html><body><h1>502 Bad Gateway</h1></body></html>",
    );
    match send_to(answer).await {
        SendOutcome::Failed(f) => {
            assert_eq!(f.class, FailureClass::OutcomeUnknown, "{f}");
            assert_eq!((f.http_status, f.code), (Some(502), None));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_5xx_with_a_graph_error_body_is_classified_by_its_code() {
    let body = r#"{"error":{"message":"An unexpected error has occurred. Please retry your request later.","type":"OAuthException","code":2,"fbtrace_id":"Xy"}}"#;
    let answer = http_answer(
        "500 Internal Server Error",
        &["content-type: application/json"],
        body,
    );
    match send_to(answer).await {
        SendOutcome::Failed(f) => {
            assert_eq!((f.class, f.code), (Transient, Some(2)), "{f}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn usage_headers_are_read_on_success() {
    let answer = http_answer(
        "200 OK",
        &[
            "content-type: application/json",
            r#"x-app-usage: {"call_count":12,"total_time":3,"total_cputime":4}"#,
            r#"x-page-usage: {"call_count":"30"}"#,
            r#"x-business-use-case-usage: {"123":[{"type":"messenger","call_count":80,"total_time":81.5,"total_cputime":2,"estimated_time_to_regain_access":0}]}"#,
        ],
        r#"{"recipient_id":"psid-1","message_id":"m_1"}"#,
    );
    assert_eq!(
        send_to(answer).await,
        SendOutcome::Sent {
            message_id: "m_1".into(),
            recipient_id: Some("psid-1".into()),
            usage: Some(Usage {
                percent: 81.5,
                regain_after: None
            }),
        }
    );
}

#[tokio::test]
async fn no_usage_headers_no_usage_and_garbage_is_ignored() {
    let ok = r#"{"message_id":"m_2"}"#;
    let plain = http_answer("200 OK", &["content-type: application/json"], ok);
    match send_to(plain).await {
        SendOutcome::Sent { usage, .. } => assert_eq!(usage, None),
        other => panic!("unexpected {other:?}"),
    }
    let garbage = http_answer(
        "200 OK",
        &[
            "x-app-usage: {{{{",
            "x-page-usage: 99",
            r#"x-business-use-case-usage: {"1":"x"}"#,
        ],
        ok,
    );
    match send_to(garbage).await {
        SendOutcome::Sent { usage, .. } => assert_eq!(usage, None),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn usage_and_an_http_date_retry_after_on_a_rate_limit() {
    // A date in the future, as a server would send it.
    let later = OffsetDateTime::now_utc() + time::Duration::seconds(120);
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let date = later.format(format).expect("format");
    let body = r#"{"error":{"message":"(#4) Application request limit reached","type":"OAuthException","code":4,"fbtrace_id":"Ab"}}"#;
    let answer = http_answer(
        "400 Bad Request",
        &[
            &format!("retry-after: {date}"),
            r#"x-app-usage: {"call_count":103,"total_time":10,"total_cputime":10}"#,
        ],
        body,
    );
    match send_to(answer).await {
        SendOutcome::Failed(f) => {
            assert_eq!((f.class, f.code), (AppThrottled, Some(4)), "{f}");
            let wait = f.retry_after.expect("a wait");
            assert!(
                wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
                "{wait:?}"
            );
            assert_eq!(
                f.usage,
                Some(Usage {
                    percent: 103.0,
                    regain_after: None
                })
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_bare_429_uses_the_usage_regain_time_as_its_wait() {
    let answer = http_answer(
        "429 Too Many Requests",
        &[r#"x-page-usage: {"call_count":100,"estimated_time_to_regain_access":2}"#],
        "slow down",
    );
    match send_to(answer).await {
        SendOutcome::Failed(f) => {
            assert_eq!(f.class, RateLimited, "{f}");
            assert_eq!(f.retry_after, Some(Duration::from_secs(120)));
            assert_eq!(
                f.usage.and_then(|u| u.regain_after),
                Some(Duration::from_secs(120))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_success_without_a_message_id_keeps_the_usage() {
    let answer = http_answer(
        "200 OK",
        &[r#"x-app-usage: {"call_count":50}"#],
        r#"{"recipient_id":"psid-1"}"#,
    );
    match send_to(answer).await {
        SendOutcome::Failed(f) => {
            assert_eq!(f.class, FailureClass::OutcomeUnknown, "{f}");
            assert_eq!(f.usage.map(|u| u.percent), Some(50.0));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_usage_header_with_non_ascii_text_is_read() {
    let answer = http_answer(
        "200 OK",
        &[
            r#"x-business-use-case-usage: {"1":[{"type":"messenger","name":"Café","call_count":77}]}"#,
        ],
        r#"{"message_id":"m_3"}"#,
    );
    match send_to(answer).await {
        SendOutcome::Sent { usage, .. } => assert_eq!(usage.map(|u| u.percent), Some(77.0)),
        other => panic!("unexpected {other:?}"),
    }
}
