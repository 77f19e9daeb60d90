//! The skewed-pages run of the `scheduler` suite: many pages, one of them carrying 80 % of the
//! opt-ins and a backlog far beyond its send budget, the others a trickle — the shape of a
//! technology provider with one client running a campaign.
//!
//! Figures: sends/s against the capacity the page limits allow (the same run's ceiling: the
//! big page's limit plus the small pages' arrivals), the highest number of calls any page got
//! in one sliding second against `PAGE_RATE_LIMIT`, and the small pages' time from webhook to
//! Graph call with the big page's backlog against the same time measured first without it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use lc_testkit::fake_graph::RecordedCall;
use time::OffsetDateTime;

use crate::bodies::{delivery, optin_item, sign, unix_ms};
use crate::env::{BenchEnv, stop};
use crate::hist::{Latency, round3};
use crate::load::open_loop;
use crate::report::Report;

/// Sizes of the skewed-pages run.
#[derive(Debug, Clone)]
pub struct SkewParams {
    /// Pages in all (the first one is the big page).
    pub pages: usize,
    /// `PAGE_RATE_LIMIT` (calls per page per second, cluster-wide).
    pub page_limit: u32,
    /// Opt-ins per second posted for the small pages together.
    pub small_rate: f64,
    /// Length of the baseline phase (small pages only).
    pub baseline: Duration,
    /// Length of the skewed phase (80 % of the posts for the big page, plus its backlog).
    pub skewed: Duration,
    /// Graph latency (milliseconds).
    pub latency_ms: u64,
}

impl SkewParams {
    /// `--quick`: about 30 s.
    pub fn quick() -> Self {
        Self {
            pages: 50,
            page_limit: 20,
            small_rate: 10.0,
            baseline: Duration::from_secs(8),
            skewed: Duration::from_secs(15),
            latency_ms: 50,
        }
    }

    /// The full run: a minute of skew.
    pub fn full() -> Self {
        Self {
            baseline: Duration::from_secs(15),
            skewed: Duration::from_secs(60),
            ..Self::quick()
        }
    }

    /// A few seconds, for the smoke test.
    pub fn tiny() -> Self {
        Self {
            pages: 4,
            baseline: Duration::from_secs(1),
            skewed: Duration::from_secs(2),
            ..Self::quick()
        }
    }
}

/// Runs the skewed-pages run into `report`.
pub async fn run(params: &SkewParams, report: &mut Report) -> anyhow::Result<()> {
    let env = BenchEnv::new(params.pages.max(2)).await?;
    let _pool = env.migrated_pool(1).await?;
    let sql = env.sql().await?;
    env.graph
        .set_latency(Duration::from_millis(params.latency_ms));
    let mut config = env.scheduler_config()?;
    config.page_rate_limit = params.page_limit;
    let ingest = env.start_ingest(env.ingest_config()?).await?;
    let scheduler = env.start_scheduler(config).await?;
    let url = format!("http://{}/webhook", ingest.service.addr);
    let big = env.pages[0].clone();
    let small: Vec<String> = env.pages[1..].to_vec();
    report.note(format!(
        "skew: {} pages, PAGE_RATE_LIMIT {}/s, Graph {} ms; baseline {:?} of {} opt-ins/s over the \
         small pages; then {:?} with a backlog of {} due opt-ins on the big page and 80 % of \
         the posts for it ({} opt-ins/s in all)",
        env.pages.len(),
        params.page_limit,
        params.latency_ms,
        params.baseline,
        params.small_rate,
        params.skewed,
        backlog_size(params),
        params.small_rate * 5.0,
    ));

    let before = env.graph.send_calls().len();
    let baseline = post_phase(
        &url,
        &big,
        &small,
        params.small_rate,
        params.baseline,
        false,
        "sb",
    )
    .await;
    let calls = wait_calls(&env, before + baseline.ok).await;
    let base_lat = latencies(&calls[before.min(calls.len())..], &baseline.posted, "sb");

    let backlog = backlog_size(params);
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT $1, 'bk' || i, now(), now() + interval '24 hours', now(), 'pending', now() \
         FROM generate_series(1, $2::bigint) AS i",
        &[&big, &(backlog as i64)],
    )
    .await
    .context("big page backlog")?;
    let skew_from = env.graph.send_calls().len();
    let started = OffsetDateTime::now_utc();
    let skewed = post_phase(
        &url,
        &big,
        &small,
        params.small_rate * 5.0,
        params.skewed,
        true,
        "sk",
    )
    .await;
    let ended = OffsetDateTime::now_utc();
    // Every small page's opt-in has been sent; the big page's backlog is left unsent.
    let small_posted = skewed.small_ok;
    let calls = wait_small(&env, skew_from, small_posted).await;
    stop(&scheduler.shutdown, scheduler.service.task).await;
    stop(&ingest.shutdown, ingest.service.task).await;

    let during: Vec<&RecordedCall> = calls[skew_from.min(calls.len())..]
        .iter()
        .filter(|c| c.at >= started && c.at <= ended)
        .collect();
    let secs = (ended - started).as_seconds_f64().max(0.001);
    let rate = during.len() as f64 / secs;
    let capacity = f64::from(params.page_limit) + params.small_rate;
    let skew_lat = latencies(&calls[skew_from.min(calls.len())..], &skewed.posted, "sk");
    let peak = peak_per_page(&calls[before.min(calls.len())..]);
    let (peak_page, peak_calls) = peak
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or((String::new(), 0), |(p, n)| (p.clone(), *n));

    report.add(
        "skew_sends_per_s",
        rate.round(),
        "sends/s",
        "Graph calls/s during the skewed phase, all pages",
    );
    report.add(
        "skew_capacity_per_s",
        capacity.round(),
        "sends/s",
        "ceiling: the big page's limit + the small pages' arrival rate",
    );
    report.add(
        "skew_sends_vs_capacity",
        round3(rate / capacity),
        "ratio",
        "sends/s / capacity (1 = every page at its limit or drained)",
    );
    report.add(
        "skew_peak_calls_in_1s",
        peak_calls as f64,
        "calls",
        format!("most calls one page got in any sliding second (page {peak_page})"),
    );
    report.add(
        "skew_peak_vs_limit",
        round3(peak_calls as f64 / f64::from(params.page_limit.max(1))),
        "ratio",
        "peak calls in one second / PAGE_RATE_LIMIT (≤ 1 holds the limit)",
    );
    base_lat.report(
        report,
        "skew_small_baseline",
        "small pages: webhook → Graph call, no backlog",
    );
    skew_lat.report(
        report,
        "skew_small_backlog",
        "small pages: webhook → Graph call while the big page has a backlog",
    );
    report.add(
        "skew_small_p99_vs_baseline",
        round3(skew_lat.quantile_ms(0.99) / base_lat.quantile_ms(0.99).max(0.001)),
        "ratio",
        "small pages' p99 with the backlog / without (1 = the backlog costs them nothing)",
    );
    Ok(())
}

/// The big page's backlog: more than it can send during the skewed phase.
fn backlog_size(params: &SkewParams) -> usize {
    (f64::from(params.page_limit) * params.skewed.as_secs_f64() * 2.0).round() as usize
}

/// What one phase of posts did.
struct Posted {
    /// Posts answered `200`.
    ok: usize,
    /// Of those, posts for a small page.
    small_ok: usize,
    /// Post time (Unix ns) per index, 0 for the big page's posts and failures.
    posted: Arc<Vec<AtomicI64>>,
}

/// Posts opt-ins through ingest at `rate` for `length`: with `skewed`, four of every five for
/// the big page, else all for the small pages (round robin). Login ids are `<prefix><i>`.
async fn post_phase(
    url: &str,
    big: &str,
    small: &[String],
    rate: f64,
    length: Duration,
    skewed: bool,
    prefix: &'static str,
) -> Posted {
    let total = (rate * length.as_secs_f64()).round() as usize;
    let posted: Arc<Vec<AtomicI64>> = Arc::new((0..total).map(|_| AtomicI64::new(0)).collect());
    let small_ok = Arc::new(AtomicI64::new(0));
    let client = reqwest::Client::new();
    let op = {
        let (posted, small_ok) = (posted.clone(), small_ok.clone());
        let (url, big, small) = (url.to_owned(), big.to_owned(), small.to_vec());
        move |i: u64| {
            let now = OffsetDateTime::now_utc();
            let to_big = skewed && !i.is_multiple_of(5);
            let page = if to_big {
                big.clone()
            } else {
                let n = if skewed { i as usize / 5 } else { i as usize };
                small[n % small.len()].clone()
            };
            let signed = sign(
                delivery(
                    &page,
                    vec![optin_item(&page, &format!("{prefix}{i}"), unix_ms(now))],
                    unix_ms(now),
                ),
                1,
            );
            let req = client
                .post(&url)
                .header(lc_meta::signature::SIGNATURE_256_HEADER, &signed.signature)
                .header("content-type", "application/json")
                .body(signed.body);
            let (posted, small_ok) = (posted.clone(), small_ok.clone());
            async move {
                match req.send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::OK => {
                        if !to_big {
                            small_ok.fetch_add(1, Ordering::Relaxed);
                            if let Some(slot) = posted.get(i as usize) {
                                let ns = i64::try_from(now.unix_timestamp_nanos()).unwrap_or(0);
                                slot.store(ns, Ordering::Relaxed);
                            }
                        }
                        Ok(1)
                    }
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    };
    let run = open_loop(rate, length, Duration::ZERO, 4096, op).await;
    Posted {
        ok: run.ok as usize,
        small_ok: usize::try_from(small_ok.load(Ordering::Relaxed)).unwrap_or(0),
        posted,
    }
}

/// Waits (bounded) for `n` send calls in all.
async fn wait_calls(env: &BenchEnv, n: usize) -> Vec<RecordedCall> {
    env.graph
        .wait_for_send_calls(n, Duration::from_secs(60))
        .await
        .unwrap_or_else(|_| env.graph.send_calls())
}

/// Waits (bounded) until `n` small-page opt-ins of the skewed phase have their call.
async fn wait_small(env: &BenchEnv, from: usize, n: usize) -> Vec<RecordedCall> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let calls = env.graph.send_calls();
        let small = calls[from.min(calls.len())..]
            .iter()
            .filter(|c| c.login_id.as_deref().is_some_and(|l| l.starts_with("sk")))
            .filter(|c| c.page_id != env.pages[0])
            .count();
        if small >= n || tokio::time::Instant::now() > deadline {
            return calls;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Webhook → Graph call of every small-page opt-in with login ids `<prefix><i>`.
fn latencies(calls: &[RecordedCall], posted: &[AtomicI64], prefix: &str) -> Latency {
    let mut lat = Latency::new();
    for c in calls {
        let Some(i) = c
            .login_id
            .as_deref()
            .and_then(|l| l.strip_prefix(prefix))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(at) = posted
            .get(i)
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|ns| *ns > 0)
        else {
            continue;
        };
        lat.record_secs((c.at.unix_timestamp_nanos() as f64 - at as f64) / 1e9);
    }
    lat
}

/// Per page, the most calls that arrived within any one second (sliding window).
fn peak_per_page(calls: &[RecordedCall]) -> HashMap<String, usize> {
    let mut by_page: HashMap<String, Vec<OffsetDateTime>> = HashMap::new();
    for c in calls {
        by_page.entry(c.page_id.clone()).or_default().push(c.at);
    }
    by_page
        .into_iter()
        .map(|(page, mut at)| {
            at.sort();
            let mut peak = 0;
            let mut lo = 0;
            for hi in 0..at.len() {
                while at[hi] - at[lo] >= time::Duration::SECOND {
                    lo += 1;
                }
                peak = peak.max(hi - lo + 1);
            }
            (page, peak)
        })
        .collect()
}
