//! The opt-in funnel (issue 17): one opt-in through the real pipeline (opt-in → send → reply
//! → link), and rows as the workers leave them for two pages over two days with every outcome;
//! the admin API's `GET /funnel`, `loginconnect funnel --json` and the `funnel_*_24h` gauges
//! give the exact counts, failure reasons and percentiles those rows make.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use lc_testkit::pipeline::{
    PAGE, TestEnv, WAIT, body, eventually, metrics_text, optin_item, post_signed, reply_item,
};
use serde_json::{Value, json};
use time::{Date, OffsetDateTime};

/// A second page of the registry.
const PAGE_B: &str = "2234567890";
/// A page no registry knows (an `unknown_page` failure).
const STRAY: &str = "9999999999";

/// One opt-in as the workers leave it.
#[derive(Clone)]
struct Fx {
    page: &'static str,
    login: String,
    at: OffsetDateTime,
    state: &'static str,
    /// Seconds from the opt-in to the first message.
    sent: Option<f64>,
    /// Seconds from the first message (or the opt-in, when none) to the reply.
    replied: Option<f64>,
    reason: Option<&'static str>,
    linked: bool,
}

fn fx(page: &'static str, login: &str, at: OffsetDateTime, state: &'static str) -> Fx {
    Fx {
        page,
        login: login.to_owned(),
        at,
        state,
        sent: None,
        replied: None,
        reason: None,
        linked: false,
    }
}

impl Fx {
    fn sent(mut self, secs: f64) -> Self {
        self.sent = Some(secs);
        self
    }
    fn replied(mut self, secs: f64) -> Self {
        self.replied = Some(secs);
        self.linked = true;
        self
    }
    fn failed(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn insert(sql: &tokio_postgres::Client, f: &Fx) {
    let sent_at = f.sent.map(|s| f.at + secs(s));
    let replied_at = f.replied.map(|s| sent_at.unwrap_or(f.at) + secs(s));
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
         next_attempt_at, sent_at, replied_at, failure_reason) \
         VALUES ($1, $2, $3, $3::timestamptz + interval '24 hours', $3, $4, $3, $5, $6, $7)",
        &[
            &f.page,
            &f.login,
            &f.at,
            &f.state,
            &sent_at,
            &replied_at,
            &f.reason,
        ],
    )
    .await
    .expect("insert opt-in");
    if let Some(at) = replied_at.filter(|_| f.linked) {
        sql.execute(
            "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, $2, $3, $4)",
            &[&f.page, &f.login, &format!("PSID-{}", f.login), &at],
        )
        .await
        .expect("insert link");
    }
}

/// PostgreSQL's `percentile_cont`: linear interpolation between the closest ranks.
fn percentile(mut v: Vec<f64>, p: f64) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let pos = p * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    json!(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// What the funnel must say of these rows: counts, reasons and percentiles.
fn expected(rows: &[&Fx]) -> Value {
    let count = |f: &dyn Fn(&Fx) -> bool| rows.iter().filter(|r| f(r)).count();
    let reasons = [
        "graph_permanent",
        "unknown_page",
        "other_page",
        "outcome_unknown",
        "retries_exhausted",
    ];
    let failures: serde_json::Map<String, Value> = reasons
        .iter()
        .map(|r| {
            let n = count(&|f| f.state == "failed" && f.reason == Some(r));
            ((*r).to_owned(), json!(n))
        })
        .collect();
    let to_send: Vec<f64> = rows.iter().filter_map(|r| r.sent).collect();
    let to_reply: Vec<f64> = rows
        .iter()
        .filter(|r| r.sent.is_some())
        .filter_map(|r| r.replied)
        .collect();
    json!({
        "opted_in": rows.len(),
        "sent": count(&|f| f.sent.is_some()),
        "replied": count(&|f| f.replied.is_some()),
        "linked": count(&|f| f.linked),
        "expired": count(&|f| f.state == "expired"),
        "failed": count(&|f| f.state == "failed"),
        "failures": failures,
        "time_to_first_message_seconds": {"p50": percentile(to_send.clone(), 0.5), "p90": percentile(to_send, 0.9)},
        "time_to_reply_seconds": {"p50": percentile(to_reply.clone(), 0.5), "p90": percentile(to_reply, 0.9)},
    })
}

/// The expected rows of a per-day report: by page, then day.
fn expected_days(all: &[Fx], pages: &[&str]) -> Vec<Value> {
    let mut groups: BTreeMap<(&str, Date), Vec<&Fx>> = BTreeMap::new();
    for f in all.iter().filter(|f| pages.contains(&f.page)) {
        groups.entry((f.page, f.at.date())).or_default().push(f);
    }
    groups
        .into_iter()
        .map(|((page, day), rows)| {
            let mut v = expected(&rows);
            v["page_id"] = json!(page);
            v["day"] = json!(day.to_string());
            v
        })
        .collect()
}

/// Asserts `got` equals `want` field by field, numbers within a microsecond.
fn assert_rows(got: &Value, want: &[Value]) {
    let got = got.as_array().expect("rows");
    assert_eq!(got.len(), want.len(), "rows: {got:#?}\nwanted {want:#?}");
    for (g, w) in got.iter().zip(want) {
        for (k, wv) in w.as_object().expect("object") {
            let gv = &g[k];
            match (gv, wv) {
                (Value::Object(go), Value::Object(wo)) if k.starts_with("time_") => {
                    for q in ["p50", "p90"] {
                        close(
                            &go[q],
                            &wo[q],
                            &format!("{} {} {k}.{q}", w["page_id"], w["day"]),
                        );
                    }
                }
                _ => assert_eq!(gv, wv, "{} {} {k}", w["page_id"], w["day"]),
            }
        }
    }
}

fn close(got: &Value, want: &Value, what: &str) {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) => assert!((g - w).abs() < 1e-3, "{what}: {g} != {w}"),
        _ => assert_eq!(got, want, "{what}"),
    }
}

/// The value of one series in a metrics text.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn cli(env: &TestEnv, args: &[&str]) -> Result<String, lc_worker::cli::CliError> {
    let db = env.db.url();
    let amqp = env.vhost.url();
    let mut argv = vec!["loginconnect", "--amqp-url", &amqp, "--database-url", &db];
    argv.extend_from_slice(args);
    let parsed = lc_worker::cli::Cli::try_parse_from(argv).expect("valid arguments");
    let mut out = Vec::new();
    lc_worker::cli::run(parsed, &mut out).await?;
    Ok(String::from_utf8(out).expect("utf-8"))
}

/// The fixtures: two pages over two older days with every outcome, and recent rows (the
/// last 24 h, for the gauges) including one of a page no registry knows.
fn fixtures(now: OffsetDateTime) -> Vec<Fx> {
    let noon = |days_ago: u64| {
        (now - Duration::from_secs(days_ago * 86_400)).replace_time(time::macros::time!(12:00))
    };
    let (d1, d2) = (noon(3), noon(2));
    let recent = now - Duration::from_secs(3600);
    vec![
        fx(PAGE, "A1", d1, "sent").sent(10.0).replied(60.0),
        fx(PAGE, "A2", d1, "sent").sent(20.0),
        fx(PAGE, "A3", d1 + secs(5.0), "sent")
            .sent(40.0)
            .replied(120.0),
        fx(PAGE, "A4", d1, "failed").failed("graph_permanent"),
        fx(PAGE, "A5", d1, "expired"),
        fx(PAGE, "A6", d1, "replied").replied(30.0),
        fx(PAGE, "A7", d2, "sent").sent(5.0),
        fx(PAGE, "A8", d2, "failed").failed("other_page"),
        fx(PAGE, "A9", d2, "failed").failed("retries_exhausted"),
        fx(PAGE, "A10", d2, "pending"),
        fx(PAGE_B, "B1", d1, "sent").sent(100.0).replied(10.0),
        fx(PAGE_B, "B2", d1, "failed").failed("outcome_unknown"),
        fx(PAGE_B, "B3", d2, "expired"),
        fx(PAGE_B, "B4", d2, "sent").sent(3.0),
        fx(PAGE_B, "B5", d2, "failed").failed("graph_permanent"),
        fx(PAGE, "R1", recent, "sent").sent(8.0),
        fx(PAGE, "R2", recent, "failed").failed("graph_permanent"),
        fx(PAGE, "R3", recent, "expired"),
        fx(PAGE_B, "R4", recent, "sent").sent(30.0).replied(90.0),
        fx(PAGE_B, "R5", recent, "failed").failed("retries_exhausted"),
        fx(PAGE_B, "R6", recent, "expired"),
        fx(STRAY, "R7", recent, "failed").failed("unknown_page"),
    ]
}

#[tokio::test]
async fn the_funnel_counts_every_stage_in_the_api_the_cli_and_the_gauges() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["identity.linked.#"]).await;
    let mut p = env
        .pipeline()
        .scheduler(env.scheduler_config())
        .correlator()
        .start()
        .await;

    // The real path: opt-in → first message → reply → link.
    let now = OffsetDateTime::now_utc();
    let opted = optin_item(PAGE, "LIVE", now);
    assert_eq!(post_signed(&p.ingest, body(PAGE, vec![opted])).await, 200);
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("the first message is sent");
    let reply = reply_item(PAGE, "PSID-LIVE", "m_live", "LIVE", now + secs(30.0));
    assert_eq!(post_signed(&p.ingest, body(PAGE, vec![reply])).await, 200);
    assert_eq!(env.deliveries(&events, 1, WAIT).await.len(), 1, "linked");
    p.stop().await;

    let sql = env.sql().await;
    let live = sql
        .query_one(
            "SELECT state, opted_in_at, EXTRACT(EPOCH FROM sent_at - opted_in_at)::float8, \
             EXTRACT(EPOCH FROM replied_at - sent_at)::float8, \
             EXISTS (SELECT 1 FROM links WHERE page_id = $1 AND login_id = 'LIVE') \
             FROM optins WHERE page_id = $1 AND login_id = 'LIVE'",
            &[&PAGE],
        )
        .await
        .expect("the live opt-in");
    assert_eq!(live.get::<_, String>(0), "sent");
    assert!(live.get::<_, bool>(4), "the live opt-in is linked");
    let live = Fx {
        page: PAGE,
        login: "LIVE".into(),
        at: live.get(1),
        state: "sent",
        sent: Some(live.get(2)),
        replied: Some(live.get(3)),
        reason: None,
        linked: true,
    };

    sql.execute(
        "INSERT INTO pages (page_id, first_message, source) VALUES ($1, '{\"text\": \"Hi\"}', 'api')",
        &[&PAGE_B],
    )
    .await
    .expect("page B in the registry");
    let mut all = fixtures(now);
    for f in &all {
        insert(&sql, f).await;
    }
    all.push(live.clone());

    // The admin API, over the three days up to tomorrow.
    let from = (now - Duration::from_secs(3 * 86_400)).date().to_string();
    let to = now.date().next_day().expect("tomorrow").to_string();
    let admin = env.start_admin().await;
    let answer = admin.read(&format!("/funnel?from={from}&to={to}")).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let both = expected_days(&all, &[PAGE, PAGE_B, STRAY]);
    assert_rows(&answer.body["rows"], &both);
    assert!(
        answer.body["coverage"]
            .as_str()
            .expect("coverage")
            .contains("OPTIN_RETENTION_DAYS")
    );
    assert!(answer.body["retained_since"].is_string());

    // One page.
    let one = admin
        .read(&format!("/funnel?from={from}&to={to}&page_id={PAGE_B}"))
        .await;
    assert_rows(&one.body["rows"], &expected_days(&all, &[PAGE_B]));
    assert_eq!(one.body["page_id"], PAGE_B);

    // Bad parameters are named.
    for (query, parameter) in [
        ("from=2026-02-30", "from"),
        ("to=12/01/2026", "to"),
        ("from=2026-01-01&to=2026-12-01", "to"),
        ("page_id=abc", "page_id"),
        ("day=2026-12-01", "day"),
    ] {
        let bad = admin.read(&format!("/funnel?{query}")).await;
        assert_eq!(bad.status, 400, "{query}: {}", bad.text);
        assert_eq!(bad.body["error"]["code"], "invalid");
        let message = bad.body["error"]["message"].as_str().expect("message");
        assert!(message.contains(parameter), "{query}: {message}");
    }

    // The CLI reads the same report.
    let json_out = cli(&env, &["funnel", "--from", &from, "--to", &to, "--json"])
        .await
        .expect("funnel --json");
    let from_cli: Value = serde_json::from_str(&json_out).expect("JSON");
    assert_eq!(from_cli, answer.body, "the CLI and the API agree");
    let table = cli(
        &env,
        &["funnel", "--page", PAGE, "--from", &from, "--to", &to],
    )
    .await
    .expect("funnel table");
    assert!(table.contains("graph_permanent 1"), "{table}");
    assert!(!table.contains(PAGE_B), "only the page asked for:\n{table}");
    let refused = cli(&env, &["funnel", "--from", "soon"]).await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().starts_with("--from")),
        "{refused:?}"
    );
    admin.stop().await;

    // The gauges: the last 24 h, refreshed at the scheduler's start.
    let (scheduler, stop) = env.start_scheduler(env.scheduler_config()).await;
    let day_ago = now - Duration::from_secs(86_400);
    let recent: Vec<&Fx> = all.iter().filter(|f| f.at > day_ago).collect();
    let want_a = expected(
        &recent
            .iter()
            .copied()
            .filter(|f| f.page == PAGE)
            .collect::<Vec<_>>(),
    );
    let want_b = expected(
        &recent
            .iter()
            .copied()
            .filter(|f| f.page == PAGE_B)
            .collect::<Vec<_>>(),
    );
    let opted_a = format!("funnel_optins_24h{{page_id=\"{PAGE}\",stage=\"opted_in\"}}");
    let addr = scheduler.metrics_addr;
    eventually(WAIT, "the funnel gauges are refreshed", || async {
        series(&metrics_text(addr).await, &opted_a) == want_a["opted_in"].as_f64()
    })
    .await;
    let text = metrics_text(addr).await;
    for (page, want) in [(PAGE, &want_a), (PAGE_B, &want_b)] {
        for stage in ["opted_in", "sent", "replied", "linked", "expired", "failed"] {
            let s = format!("funnel_optins_24h{{page_id=\"{page}\",stage=\"{stage}\"}}");
            assert_eq!(series(&text, &s), want[stage].as_f64(), "{s}");
        }
        for (reason, n) in want["failures"].as_object().expect("failures") {
            let s = format!("funnel_failures_24h{{page_id=\"{page}\",reason=\"{reason}\"}}");
            assert_eq!(series(&text, &s), n.as_f64(), "{s}");
        }
        for (metric, key) in [
            (
                "funnel_time_to_first_message_seconds_24h",
                "time_to_first_message_seconds",
            ),
            ("funnel_time_to_reply_seconds_24h", "time_to_reply_seconds"),
        ] {
            for (q, p) in [("0.5", "p50"), ("0.9", "p90")] {
                let s = format!("{metric}{{page_id=\"{page}\",quantile=\"{q}\"}}");
                let got = series(&text, &s).expect(&s);
                close(&json!(got), &want[key][p], &s);
            }
        }
    }
    // The stray page's failure is summed under one label, not a series of its own.
    assert_eq!(
        series(
            &text,
            "funnel_failures_24h{page_id=\"unregistered\",reason=\"unknown_page\"}"
        ),
        Some(1.0)
    );
    assert!(
        !text.contains(STRAY),
        "no series for an unregistered page id"
    );

    // A page that leaves the registry loses its series at the next refresh.
    sql.execute("DELETE FROM pages WHERE page_id = $1", &[&PAGE_B])
        .await
        .expect("page B deleted");
    let pool = env.migrated_pool(1).await;
    let registry = prometheus::Registry::new();
    let gauges = lc_worker::funnel::metrics::FunnelMetrics::new(&registry).expect("gauges");
    assert!(
        lc_worker::funnel::metrics::refresh(&pool, &gauges)
            .await
            .expect("refresh")
    );
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode");
    assert!(series(&text, &opted_a).is_some(), "page A kept");
    assert!(!text.contains(PAGE_B), "page B's series are gone:\n{text}");
    assert_eq!(
        series(
            &text,
            "funnel_optins_24h{page_id=\"unregistered\",stage=\"opted_in\"}"
        ),
        Some(4.0),
        "page B's recent opt-ins now count as unregistered (R4, R5, R6 and the stray R7)"
    );
    stop.trigger();
    tokio::time::timeout(WAIT, scheduler.task)
        .await
        .expect("scheduler stops")
        .expect("join");
}
