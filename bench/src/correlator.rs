//! The `correlator` suite: replies with `prior_message` published onto `messenger.webhook` in
//! ingest's own `QueuedEvent` form (a queue loaded before the correlator starts), each naming a
//! sent opt-in → links/s and `identity.linked` events published/s; and the ceiling, a bare
//! loop doing the same INSERT link + UPDATE opt-in + outbox insert, 100 per transaction.

use std::time::Duration;

use anyhow::Context as _;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lc_shared::events::{IdentityLinked, PublicEvent, insert_outbox};
use lc_shared::outgoing::event_message;
use lc_shared::telemetry::TraceParent;
use time::OffsetDateTime;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::bodies::reply_bodies_from;
use crate::env::{BenchEnv, stop};
use crate::hist::round3;
use crate::report::Report;

/// Sizes of the correlator suite.
#[derive(Debug, Clone)]
pub struct CorrelatorParams {
    /// Replies loaded onto the queue.
    pub n: usize,
    /// Link requests per ceiling run (serial and parallel each).
    pub ceiling_n: usize,
    /// Connections of the parallel ceiling run.
    pub ceiling_connections: usize,
    /// A second run with `CONSUMER_BATCH` and `CONSUMER_PREFETCH` set to these (None skips it).
    pub tuned: Option<(usize, u16)>,
}

impl CorrelatorParams {
    /// `--quick`: about 20 s.
    pub fn quick() -> Self {
        Self {
            n: 5_000,
            ceiling_n: 5_000,
            ceiling_connections: 4,
            tuned: Some((500, 1000)),
        }
    }

    /// The full run.
    pub fn full() -> Self {
        Self {
            n: 50_000,
            ceiling_n: 20_000,
            ..Self::quick()
        }
    }
}

/// Events per published body (the bodies are only a way to build ingest's messages).
const PER_BODY: usize = 50;

/// Runs the suite.
pub async fn run(params: &CorrelatorParams, quick: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("correlator", quick).await;
    crate::machine::reset_peak_rss();
    let env = BenchEnv::new(16).await?;
    let pool = env.migrated_pool(params.ceiling_connections).await?;
    let sql = env.sql().await?;
    let n = params.n.div_ceil(PER_BODY) * PER_BODY;
    let runs = 1 + usize::from(params.tuned.is_some());
    insert_sent_optins(&sql, &env.pages, "login-bench-", runs * n).await?;
    let conn = env.broker().await?;
    report.note(format!(
        "correlator with production defaults (prefetch 200 and batch 100 per loop, {} consumer \
         loops, pool 8); {n} replies with \
         prior_message pre-loaded on correlator.replies, each naming a `sent` opt-in",
        lc_worker::correlator::DEFAULT_CONSUMER_CONCURRENCY
    ));

    let link_rate = correlator_run(&env, &sql, &conn, n, 0, None, &mut report).await?;
    if let Some((batch, prefetch)) = params.tuned {
        // The same work with larger consumer batches: what configuration alone buys.
        correlator_run(
            &env,
            &sql,
            &conn,
            n,
            n,
            Some((batch, prefetch)),
            &mut report,
        )
        .await?;
    }

    insert_sent_optins(&sql, &env.pages, "cx-", 2 * params.ceiling_n).await?;
    let serial = ceiling(&pool, &env.pages, 0, params.ceiling_n, 1).await?;
    let parallel = ceiling(
        &pool,
        &env.pages,
        params.ceiling_n,
        params.ceiling_n,
        params.ceiling_connections,
    )
    .await?;
    report.add(
        "correlator_db_ceiling_serial_per_s",
        serial.round(),
        "links/s",
        "bare loop, 1 connection, 100 links per transaction",
    );
    report.add(
        "correlator_db_ceiling_per_s",
        parallel.round(),
        "links/s",
        format!(
            "bare loop, {} connections, 100 links per transaction",
            params.ceiling_connections
        ),
    );
    report.add(
        "correlator_vs_db",
        round3(link_rate / serial.max(parallel).max(1.0)),
        "ratio",
        "headline: links/s / best DB ceiling",
    );
    report.add(
        "correlator_vs_db_serial",
        round3(link_rate / serial.max(1.0)),
        "ratio",
        "links/s / one-connection DB ceiling",
    );
    let _ = conn.close(200, "done".into()).await;
    report.finish();
    report.target(
        "correlator ≥ 5000 links/s",
        "correlator_links_per_s",
        5000.0,
        false,
    );
    Ok(report)
}

/// One correlator run over `n` pre-loaded replies (events `first..first + n`); with `tuned`,
/// `(CONSUMER_BATCH, CONSUMER_PREFETCH)` replace the defaults. Returns links/s.
async fn correlator_run(
    env: &BenchEnv,
    sql: &tokio_postgres::Client,
    conn: &lapin::Connection,
    n: usize,
    first: usize,
    tuned: Option<(usize, u16)>,
    report: &mut Report,
) -> anyhow::Result<f64> {
    let links_before: i64 = sql
        .query_one("SELECT count(*) FROM links", &[])
        .await?
        .get(0);
    let loaded = Instant::now();
    publish_replies(conn, &env.pages, first, n).await?;
    let (prefix, what) = match tuned {
        None => (
            "correlator".to_owned(),
            "production defaults (batch 100, prefetch 200)".to_owned(),
        ),
        Some((batch, prefetch)) => (
            format!("correlator_batch{batch}"),
            format!("CONSUMER_BATCH {batch}, CONSUMER_PREFETCH {prefetch}"),
        ),
    };
    if tuned.is_none() {
        report.add(
            "correlator_load_per_s",
            (n as f64 / loaded.elapsed().as_secs_f64()).round(),
            "msgs/s",
            "loading the queue (publish with confirms)",
        );
    }
    let mut config = env.correlator_config()?;
    if let Some((batch, prefetch)) = tuned {
        config.worker.consumer_batch = batch;
        config.worker.prefetch = prefetch;
    }
    let started = Instant::now();
    let correlator = env.start_correlator(config).await?;
    let timeout = Duration::from_secs(30) + Duration::from_millis(5 * n as u64);
    let samples = sample_until(sql, links_before, n as i64, timeout).await?;
    stop(&correlator.shutdown, correlator.service.task).await;
    let links: Vec<(Instant, i64)> = samples.iter().map(|(t, l, _)| (*t, *l)).collect();
    let published: Vec<(Instant, i64)> = samples.iter().map(|(t, _, p)| (*t, *p)).collect();
    let link_rate = steady(&links, n as i64);
    report.add(
        format!("{prefix}_links_per_s"),
        link_rate.round(),
        "links/s",
        format!("links committed/s, steady state (10%–90%), {what}"),
    );
    report.add(
        format!("{prefix}_events_published_per_s"),
        steady(&published, n as i64).round(),
        "events/s",
        "identity.linked published by the relay/s (10%–90%)",
    );
    let done_at = |series: &[(Instant, i64)]| {
        series
            .iter()
            .find(|(_, c)| *c >= n as i64)
            .map(|(t, _)| t.duration_since(started).as_secs_f64())
    };
    if let (Some(l), Some(p)) = (done_at(&links), done_at(&published)) {
        report.add(
            format!("{prefix}_all_linked_s"),
            round3(l),
            "s",
            "start → every link committed",
        );
        report.add(
            format!("{prefix}_all_published_s"),
            round3(p),
            "s",
            "start → every event published",
        );
    }
    Ok(link_rate)
}

/// Inserts `n` opt-ins in state `sent` named `<prefix><i:08>`, on the page the bench's reply
/// `i` goes to.
async fn insert_sent_optins(
    sql: &tokio_postgres::Client,
    pages: &[String],
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at, \
             message_id, sent_at, attempts, finished_at) \
         SELECT ($1::text[])[1 + ((i / $4::bigint) % array_length($1::text[], 1))], $2::text || lpad(i::text, 8, '0'), \
                now() - interval '1 hour', now() + interval '23 hours', now() - interval '1 hour', 'sent', \
                now() - interval '1 hour', 'm_' || i, now() - interval '1 hour', 1, now() - interval '1 hour' \
         FROM generate_series(0::bigint, $3::bigint - 1) AS i",
        &[&pages, &prefix, &(n as i64), &(PER_BODY as i64)],
    )
    .await
    .context("inserting sent opt-ins")?;
    Ok(())
}

/// Publishes replies `first..first + n` (ingest's messages for the bench bodies) with
/// confirms, 1000 in flight.
async fn publish_replies(
    conn: &lapin::Connection,
    pages: &[String],
    first: usize,
    n: usize,
) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let trace = TraceParent::new_root().to_string();
    let (from, to) = (first / PER_BODY, (first + n) / PER_BODY);
    for body_no in (from..to).step_by(20) {
        let count = 20.min(to - body_no);
        let mut confirms = Vec::with_capacity(count * PER_BODY);
        for body in reply_bodies_from(pages, body_no, count, PER_BODY) {
            for ev in lc_meta::webhook::parse_delivery(&body.body)? {
                let m = event_message(&ev, &trace)?;
                confirms.push(
                    ch.basic_publish(
                        m.exchange.into(),
                        m.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &m.body,
                        m.properties,
                    )
                    .await?,
                );
            }
        }
        for c in confirms {
            match c.await? {
                Confirmation::Ack(None) => {}
                other => anyhow::bail!("loading the queue: not confirmed: {other:?}"),
            }
        }
    }
    let _ = ch.close(200, "loaded".into()).await;
    Ok(())
}

/// Samples (links made, events published) every 50 ms, counted from `links_before`, until
/// both reach `n`.
async fn sample_until(
    sql: &tokio_postgres::Client,
    links_before: i64,
    n: i64,
    timeout: Duration,
) -> anyhow::Result<Vec<(Instant, i64, i64)>> {
    let deadline = Instant::now() + timeout;
    let mut samples = vec![(Instant::now(), 0, 0)];
    loop {
        let row = sql
            .query_one(
                "SELECT (SELECT count(*) FROM links), \
                        (SELECT count(*) FROM outbox WHERE published_at IS NOT NULL)",
                &[],
            )
            .await?;
        let (links, published) = (
            row.get::<_, i64>(0) - links_before,
            row.get::<_, i64>(1) - links_before,
        );
        samples.push((Instant::now(), links, published));
        if links >= n && published >= n {
            return Ok(samples);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "timed out waiting for {n} links and events (have {links} and {published})"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rate between the samples where the count first reached 10% and 90% of `n`.
pub fn steady(samples: &[(Instant, i64)], n: i64) -> f64 {
    let first_at = |frac: f64| {
        samples
            .iter()
            .find(|(_, c)| *c as f64 >= frac * n as f64)
            .copied()
    };
    match (first_at(0.1), first_at(0.9)) {
        (Some((t1, c1)), Some((t2, c2))) if t2 > t1 => (c2 - c1) as f64 / (t2 - t1).as_secs_f64(),
        // Everything landed between two samples: bound the rate by the sampling interval.
        (Some((t1, _)), Some(_)) => match samples.first() {
            Some((t0, _)) if t1 > *t0 => n as f64 / (t1 - *t0).as_secs_f64(),
            _ => 0.0,
        },
        _ => 0.0,
    }
}

/// The correlator's SQL for one reply, without the consumer: `INSERT … links … ON CONFLICT DO
/// NOTHING`, the opt-in update and the `identity.linked` outbox row; 100 per transaction.
async fn ceiling(
    pool: &deadpool_postgres::Pool,
    pages: &[String],
    first: usize,
    n: usize,
    connections: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut workers = JoinSet::new();
    let per = n.div_ceil(connections.max(1));
    for w in 0..connections.max(1) {
        let pool = pool.clone();
        let pages = pages.to_vec();
        let range = (first + w * per)..(first + ((w + 1) * per).min(n));
        workers.spawn(async move {
            let mut client = pool.get().await?;
            let ids: Vec<usize> = range.collect();
            for chunk in ids.chunks(100) {
                let tx = client.transaction().await?;
                for &i in chunk {
                    link_one(
                        &tx,
                        &pages[(i / PER_BODY) % pages.len()],
                        &format!("cx-{i:08}"),
                        i,
                    )
                    .await?;
                }
                tx.commit().await?;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn link_one(
    tx: &deadpool_postgres::Transaction<'_>,
    page: &str,
    login_id: &str,
    i: usize,
) -> anyhow::Result<()> {
    let at = OffsetDateTime::now_utc();
    let psid = format!("{}", 8_000_000_000_000_000u64 + i as u64);
    let mid = format!("m_ceiling{i:012}");
    let inserted = tx
        .query_opt(
            "INSERT INTO links (page_id, login_id, psid, linked_at, first_reply_mid) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (page_id, login_id) DO NOTHING RETURNING psid",
            &[&page, &login_id, &psid, &at, &mid],
        )
        .await?;
    if inserted.is_none() {
        return Ok(());
    }
    let optin = tx
        .query_opt(
            "UPDATE optins SET replied_at = COALESCE(replied_at, $3), \
               state = CASE WHEN state = 'pending' THEN 'replied' ELSE state END, \
               finished_at = CASE WHEN state = 'pending' THEN now() ELSE finished_at END, \
               updated_at = now() \
             WHERE page_id = $1 AND login_id = $2 RETURNING opted_in_at",
            &[&page, &login_id, &at],
        )
        .await?;
    let event = PublicEvent::IdentityLinked(IdentityLinked {
        page_id: page.to_owned(),
        login_id: login_id.to_owned(),
        psid,
        linked_at: at,
        opted_in_at: optin.map(|r| r.get(0)),
        first_reply_mid: Some(mid),
    });
    insert_outbox(&**tx, &event, "/loginconnect/correlator", None).await?;
    Ok(())
}
