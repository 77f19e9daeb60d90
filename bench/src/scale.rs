//! The `scale` suite: a million pending opt-ins (deadlines spread over the next 24 hours, next
//! attempts in the future: delayed sends and scheduled retries) plus a steady stream of opt-ins
//! due now → latency of `store::claim_due`, its plan, table and index sizes, without and with
//! the next-attempt index (migration V3; measured both ways whatever ships), and again with the
//! whole backlog due; the real scheduler draining that backlog (schema as shipped) with its
//! resident memory sampled; the same claim with 30 % of a fresh backlog due on one paused page
//! ([`crate::paused_claim`]); then the deadline run ([`crate::expiry`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::Pool;
use lc_worker::scheduler::store;
use lc_worker::scheduler::store::claim::ClaimRequest;
use tokio::time::Instant;

use crate::env::{BenchEnv, stop};
use crate::expiry::ExpiryParams;
use crate::hist::{Latency, round3};
use crate::null_graph::NullGraph;
use crate::report::Report;

/// Sizes of the scale suite.
#[derive(Debug, Clone)]
pub struct ScaleParams {
    /// Pending opt-ins not yet due.
    pub pending: usize,
    /// Opt-ins per second inserted due now while claims are measured.
    pub due_rate: f64,
    /// Length of each claim measurement.
    pub claim_window: Duration,
    /// Length of the scheduler drain run.
    pub drain: Duration,
    /// The deadline run.
    pub expiry: ExpiryParams,
}

impl ScaleParams {
    /// `--quick`: 100,000 pending, about 40 s.
    pub fn quick() -> Self {
        Self {
            pending: 100_000,
            due_rate: 200.0,
            claim_window: Duration::from_secs(2),
            drain: Duration::from_secs(5),
            expiry: ExpiryParams::quick(),
        }
    }

    /// The full run: 1,000,000 pending.
    pub fn full() -> Self {
        Self {
            pending: 1_000_000,
            due_rate: 500.0,
            claim_window: Duration::from_secs(15),
            drain: Duration::from_secs(20),
            expiry: ExpiryParams::full(),
        }
    }
}

/// The scheduler's own claim statement, for `EXPLAIN`.
pub const CLAIM_SQL: &str = lc_worker::scheduler::store::claim::CLAIM_DUE_SQL;

/// The planner setting the scheduler runs the claim under.
pub const CLAIM_PLANNER_SQL: &str = lc_worker::scheduler::store::claim::CLAIM_PLANNER_SQL;

/// The index on the next attempt of pending rows (migration V3). The suite measures claims
/// without it and with it, whatever the migrations ship, and checks the targets against the
/// shipped schema.
pub const PROPOSED_INDEX: &str = "CREATE INDEX IF NOT EXISTS optins_pending_by_next_attempt ON optins (next_attempt_at) \
     INCLUDE (deadline) WHERE state = 'pending'";

/// Runs the suite.
pub async fn run(params: &ScaleParams, quick: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("scale", quick).await;
    crate::machine::reset_peak_rss();
    let env = BenchEnv::new(16).await?;
    let pool = env.migrated_pool(4).await?;
    let sql = env.sql().await?;

    let t = Instant::now();
    bulk_insert(&sql, &env.pages, params.pending).await?;
    report.add(
        "scale_pending",
        params.pending as f64,
        "rows",
        "pending opt-ins, not yet due, deadlines over 24 h",
    );
    report.add(
        "scale_bulk_insert_s",
        round3(t.elapsed().as_secs_f64()),
        "s",
        "INSERT … generate_series",
    );
    sql.batch_execute("VACUUM ANALYZE optins").await?;
    sizes(&sql, &mut report).await?;
    report.note(format!(
        "claims: store::claim_due (limit 100) every 10 ms on one connection while {} due opt-ins/s \
         are inserted (their deadlines are the latest: new opt-ins); claimed rows are marked sent",
        params.due_rate
    ));

    let shipped: bool = sql
        .query_one(
            "SELECT to_regclass('optins_pending_by_next_attempt') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    report.add(
        "scale_next_attempt_index_shipped",
        f64::from(u8::from(shipped)),
        "bool",
        "the migrations create optins_pending_by_next_attempt (1) or not (0)",
    );
    sql.batch_execute("DROP INDEX IF EXISTS optins_pending_by_next_attempt")
        .await?;
    sql.batch_execute("ANALYZE optins").await?;
    claim_phase(&pool, &env.pages, params, "scale_claim", &mut report).await?;
    sql.batch_execute(PROPOSED_INDEX).await?;
    sql.batch_execute("ANALYZE optins").await?;
    claim_phase(&pool, &env.pages, params, "scale_claim_idx", &mut report).await?;

    let t = Instant::now();
    sql.batch_execute(
        "UPDATE optins SET next_attempt_at = now() - interval '1 second' WHERE state = 'pending'",
    )
    .await?;
    sql.batch_execute("VACUUM ANALYZE optins").await?;
    report.add(
        "scale_make_due_s",
        round3(t.elapsed().as_secs_f64()),
        "s",
        "UPDATE every pending row to due + VACUUM",
    );
    claim_phase(
        &pool,
        &env.pages,
        params,
        "scale_claim_alldue_idx",
        &mut report,
    )
    .await?;
    sql.batch_execute("DROP INDEX optins_pending_by_next_attempt; ANALYZE optins")
        .await?;
    claim_phase(&pool, &env.pages, params, "scale_claim_alldue", &mut report).await?;
    if shipped {
        // The drain runs against the schema as shipped.
        sql.batch_execute(PROPOSED_INDEX).await?;
        sql.batch_execute("ANALYZE optins").await?;
    }

    drain(&env, &sql, params.drain, &mut report).await?;
    drop(sql);
    drop(pool);
    drop(env);
    crate::paused_claim::run(params, &mut report).await?;
    crate::expiry::run(&params.expiry, &mut report).await?;
    report.finish();
    let (pending, all_due) = if shipped {
        ("scale_claim_idx_p99_ms", "scale_claim_alldue_idx_p99_ms")
    } else {
        ("scale_claim_p99_ms", "scale_claim_alldue_p99_ms")
    };
    report.target(
        "claim p99 < 5 ms with the pending backlog (shipped schema)",
        pending,
        5.0,
        true,
    );
    report.target(
        "claim p99 < 5 ms with the whole backlog due (shipped schema)",
        all_due,
        5.0,
        true,
    );
    report.target(
        "claim p99 < 5 ms with 30 % of the backlog due on a paused page (shipped schema)",
        "scale_claim_paused_p99_ms",
        5.0,
        true,
    );
    report.target(
        "flat RSS while draining (< 4 MB growth over the second half)",
        "scale_drain_rss_growth_second_half_mb",
        4.0,
        true,
    );
    Ok(report)
}

/// Inserts `n` pending opt-ins: opted in at a random time in the last 24 hours (so deadlines
/// are spread over the next 24), next attempt 10 minutes to 24 hours from now.
pub(crate) async fn bulk_insert(
    sql: &tokio_postgres::Client,
    pages: &[String],
    n: usize,
) -> anyhow::Result<()> {
    // Unlimited send budget: the suite measures the database, not a page's rate.
    crate::env::unlimited_pages(sql, pages).await?;
    sql.execute(
        "WITH s AS MATERIALIZED ( \
             SELECT i, now() - random() * interval '24 hours' AS o, \
                    now() + interval '10 minutes' + random() * interval '24 hours' AS next \
             FROM generate_series(0::bigint, $2::bigint - 1) AS i) \
         INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT ($1::text[])[1 + (i % array_length($1::text[], 1))], 's' || i, o, \
                o + interval '24 hours', o, 'pending', next FROM s",
        &[&pages, &(n as i64)],
    )
    .await
    .context("bulk insert")?;
    Ok(())
}

async fn sizes(sql: &tokio_postgres::Client, report: &mut Report) -> anyhow::Result<()> {
    let total: i64 = sql
        .query_one("SELECT pg_total_relation_size('optins')", &[])
        .await?
        .get(0);
    let heap: i64 = sql
        .query_one("SELECT pg_relation_size('optins')", &[])
        .await?
        .get(0);
    report.add(
        "scale_optins_total_mb",
        mb(total),
        "MB",
        "pg_total_relation_size(optins)",
    );
    report.add(
        "scale_optins_heap_mb",
        mb(heap),
        "MB",
        "pg_relation_size(optins)",
    );
    for row in sql
        .query(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'optins'::regclass \
             ORDER BY c.relname",
            &[],
        )
        .await?
    {
        let name: String = row.get(0);
        let size: i64 = row.get(1);
        report.add(
            format!("scale_index_{name}_mb"),
            mb(size),
            "MB",
            format!("pg_relation_size({name})"),
        );
    }
    Ok(())
}

fn mb(bytes: i64) -> f64 {
    round3(bytes as f64 / 1_048_576.0)
}

/// Measures claims for one window while a due stream is inserted on `pages`; attaches the
/// claim's plan.
pub(crate) async fn claim_phase(
    pool: &Pool,
    pages: &[String],
    params: &ScaleParams,
    name: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let running = Arc::new(AtomicBool::new(true));
    let stream = {
        let (pool, pages, running) = (pool.clone(), pages.to_vec(), running.clone());
        let per_tick = (params.due_rate / 10.0).round().max(1.0) as i64;
        let tag = name.to_owned();
        tokio::spawn(async move {
            let client = pool.get().await?;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut seq = 0i64;
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                client
                    .execute(
                        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
                         SELECT ($1::text[])[1 + (i % array_length($1::text[], 1))], $2::text || i, \
                                now(), now() + interval '24 hours', now(), 'pending', now() \
                         FROM generate_series(0::bigint, $3::bigint - 1) AS i",
                        &[&pages, &format!("{tag}-{seq}-"), &per_tick],
                    )
                    .await?;
                seq += 1;
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    let mut client = pool.get().await?;
    let mut lat = Latency::new();
    let mut claimed = 0usize;
    let mut claims = 0u64;
    let end = Instant::now() + params.claim_window;
    while Instant::now() < end {
        let t = Instant::now();
        let rows = store::claim::claim_due(&mut client, &claim_request()).await?;
        lat.record(t.elapsed());
        claims += 1;
        claimed += rows.len();
        if !rows.is_empty() {
            client
                .execute(
                    "UPDATE optins SET state = 'sent', finished_at = now(), sent_at = now(), \
                     lease_owner = NULL, lease_expires_at = NULL \
                     WHERE state = 'sending' AND lease_owner = 'bench-claim'",
                    &[],
                )
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.store(false, Ordering::Relaxed);
    stream.await??;
    lat.report(report, name, "store::claim_due latency");
    report.add(
        format!("{name}_rows_per_claim"),
        round3(claimed as f64 / claims.max(1) as f64),
        "rows",
        "rows returned per claim",
    );
    let plan = explain(&mut client).await?;
    if let Some(ms) = plan
        .lines()
        .find_map(|l| l.trim().strip_prefix("Execution Time: "))
        .and_then(|s| s.trim_end_matches(" ms").parse::<f64>().ok())
    {
        report.add(
            format!("{name}_explain_ms"),
            ms,
            "ms",
            "EXPLAIN ANALYZE execution time of one claim",
        );
    }
    report.attach(format!("{name}_explain"), plan);
    Ok(())
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the claim as `claim_due` runs it — the same planner
/// setting ([`CLAIM_PLANNER_SQL`]: without it PostgreSQL may pick another plan) and the
/// parameters of the measured `ClaimRequest` — in a transaction that is rolled back.
async fn explain(client: &mut deadpool_postgres::Client) -> anyhow::Result<String> {
    let request = claim_request();
    let lookahead = request.lookahead.as_secs_f64();
    let margin = request.safety_margin.as_secs_f64();
    let tx = client.transaction().await?;
    tx.batch_execute(CLAIM_PLANNER_SQL).await?;
    let rows = tx
        .query(
            &format!("EXPLAIN (ANALYZE, BUFFERS) {CLAIM_SQL}"),
            &[&request.slot_stretch, &lookahead, &request.limit, &margin],
        )
        .await?;
    tx.rollback().await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The claim every measurement times (and explains): the shape the scheduler asks for.
fn claim_request() -> ClaimRequest<'static> {
    ClaimRequest::new("bench-claim", Duration::from_secs(60), 100)
}

/// The real scheduler draining the (now due) backlog against a non-recording Graph, with its
/// resident memory sampled every 250 ms.
async fn drain(
    env: &BenchEnv,
    sql: &tokio_postgres::Client,
    window: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    let graph = NullGraph::start().await?;
    let mut config = env.scheduler_config()?;
    config.graph_api_url = graph.base_url();
    let pending: i64 = sql
        .query_one("SELECT count(*) FROM optins WHERE state = 'pending'", &[])
        .await?
        .get(0);
    let rss_before = crate::machine::rss_kb();
    let scheduler = env.start_scheduler(config).await?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut after_first = None;
    let mut halfway = None;
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(250)).await;
        samples.push((started.elapsed(), crate::machine::rss_kb(), graph.calls()));
        if after_first.is_none() && started.elapsed() >= Duration::from_secs(1) {
            after_first = samples.last().copied();
        }
        if halfway.is_none() && started.elapsed() >= window / 2 {
            halfway = samples.last().copied();
        }
    }
    stop(&scheduler.shutdown, scheduler.service.task).await;
    let (Some(first), Some(last)) = (after_first, samples.last().copied()) else {
        return Ok(());
    };
    let rate = (last.2 - first.2) as f64 / (last.0 - first.0).as_secs_f64().max(0.001);
    let max_rss = samples.iter().map(|s| s.1).max().unwrap_or(0);
    report.add(
        "scale_drain_backlog",
        pending as f64,
        "rows",
        "due rows when the scheduler started",
    );
    report.add(
        "scale_drain_sends_per_s",
        rate.round(),
        "sends/s",
        "scheduler sends/s draining the backlog (null Graph, 0 ms), after the first second",
    );
    report.add(
        "scale_drain_rss_before_mb",
        kb_mb(rss_before),
        "MB",
        "process RSS before the scheduler started",
    );
    report.add(
        "scale_drain_rss_max_mb",
        kb_mb(max_rss),
        "MB",
        "largest RSS sample while draining",
    );
    report.add(
        "scale_drain_rss_growth_mb",
        round3((last.1 as f64 - first.1 as f64) / 1024.0),
        "MB",
        "RSS at the end minus RSS after the first second (warm-up of pools and buffers included)",
    );
    if let Some(half) = halfway {
        report.add(
            "scale_drain_rss_growth_second_half_mb",
            round3((last.1 as f64 - half.1 as f64) / 1024.0),
            "MB",
            "RSS at the end minus RSS halfway (flat ≈ 0)",
        );
    }
    report.attach(
        "scale_drain_rss_samples",
        samples
            .iter()
            .map(|(t, rss, calls)| format!("{:.2}s rss={}kB calls={calls}", t.as_secs_f64(), rss))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    Ok(())
}

fn kb_mb(kb: u64) -> f64 {
    round3(kb as f64 / 1024.0)
}
