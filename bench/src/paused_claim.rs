//! The `scale` suite's paused-page claim: of the pending backlog, 30 % belong to one page that
//! is paused, and all of that page's rows are due (a paused page's backlog piles up due rows:
//! nothing sends them); the other pages' rows are spread as in the rest of the suite (next
//! attempt 10 min–24 h ahead) and a steady stream of opt-ins due now arrives on them. The
//! claim leaves the paused page out through `page_state`; this measures whether it also
//! avoids *reading* that page's due rows (a global index walked with a page filter would read
//! all of them at every claim).

use anyhow::Context as _;
use lc_worker::scheduler::store;
use lc_worker::scheduler::store::pages::PauseReason;
use tokio::time::Instant;

use crate::env::BenchEnv;
use crate::hist::round3;
use crate::report::Report;
use crate::scale::ScaleParams;

/// Share of the pending backlog on the paused page.
pub const PAUSED_SHARE: f64 = 0.3;

/// Runs the measurement in its own scratch database (schema as shipped), adding
/// `scale_claim_paused_*` to `report`.
pub async fn run(params: &ScaleParams, report: &mut Report) -> anyhow::Result<()> {
    let env = BenchEnv::new(16).await?;
    let pool = env.migrated_pool(4).await?;
    let sql = env.sql().await?;
    let (paused, others) = env
        .pages
        .split_first()
        .context("the environment has pages")?;
    let on_paused = (params.pending as f64 * PAUSED_SHARE).round() as usize;

    let t = Instant::now();
    crate::env::unlimited_pages(&sql, &env.pages).await?;
    insert_backlog(&sql, others, params.pending - on_paused, paused, on_paused).await?;
    let mut client = pool.get().await?;
    let newly = store::pages::pause(
        &mut client,
        paused,
        PauseReason::Operator,
        None,
        "bench: paused page with a due backlog",
    )
    .await?;
    anyhow::ensure!(newly, "page {paused} was already paused");
    drop(client);
    sql.batch_execute("VACUUM ANALYZE optins").await?;
    report.add(
        "scale_claim_paused_pending",
        params.pending as f64,
        "rows",
        "pending opt-ins in the paused-page run (all pages)",
    );
    report.add(
        "scale_claim_paused_due_on_paused_page",
        on_paused as f64,
        "rows",
        "of them on the one paused page, all due now",
    );
    report.add(
        "scale_claim_paused_setup_s",
        round3(t.elapsed().as_secs_f64()),
        "s",
        "insert, pause, VACUUM ANALYZE",
    );
    report.note(format!(
        "paused-page claim: {} pending, {on_paused} of them due on one paused page (operator \
         pause), the rest on 15 pages not yet due; the due stream goes to the 15 pages",
        params.pending
    ));
    crate::scale::claim_phase(&pool, others, params, "scale_claim_paused", report).await?;
    Ok(())
}

/// Inserts `spread` pending rows over `others` as the scale suite does (opted in over the
/// last 24 h, next attempt 10 min–24 h ahead) and `due` rows on `paused`, opted in over the
/// last 24 h (deadlines over the next 24 h) and due since then.
async fn insert_backlog(
    sql: &tokio_postgres::Client,
    others: &[String],
    spread: usize,
    paused: &str,
    due: usize,
) -> anyhow::Result<()> {
    crate::scale::bulk_insert(sql, others, spread).await?;
    sql.execute(
        "WITH s AS MATERIALIZED ( \
             SELECT i, now() - random() * interval '24 hours' AS o \
             FROM generate_series(0::bigint, $2::bigint - 1) AS i) \
         INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT $1::text, 'p' || i, o, o + interval '24 hours', o, 'pending', o FROM s",
        &[&paused, &(due as i64)],
    )
    .await
    .context("insert the paused page's due rows")?;
    Ok(())
}
