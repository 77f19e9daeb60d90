//! Claiming due opt-ins with their send slots, in one transaction shared by every replica.
//!
//! Each page's send budget lives in `page_state.next_slot_at`: a claim takes the page's next
//! free slots for the rows it claims, spaced [`ClaimRequest::slot_spacing`] apart, and moves
//! `next_slot_at` past them under the page row's lock. So no two replicas ever hold the same
//! slot, the limit holds for the page whoever calls, and an idle page gets no burst: its slots
//! start at "now" plus the time the replica needs to start a call
//! ([`ClaimRequest::slot_offset`]). A replica claims a page's rows only as far as the page's
//! slots reach within [`ClaimRequest::lookahead`], so a page with a backlog never holds the replica's in-flight
//! capacity while another page could send: every page with budget and a due row is a
//! candidate, and the candidates are taken earliest deadline first.
//!
//! Paused and throttled pages (and every page while the app is throttled) are left out
//! before any opt-in row is read, through `page_state`; the per-page indexes read only a
//! page's own pending rows: its rows in deadline order as far as its budget reaches when due
//! rows lead that order, else a bounded number of its due rows (see [`CLAIM_DUE_SQL`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deadpool_postgres::Client;
use lc_meta::pages::MessageVariables;
use time::OffsetDateTime;
use tokio_postgres::types::Json;

use super::StoreError;

/// A row claimed for sending, with the fence that authorises writing its result.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The page.
    pub page_id: String,
    /// The login_id.
    pub login_id: String,
    /// Fence number of this claim.
    pub fence: i64,
    /// Send API calls already made for this opt-in (before this one).
    pub attempts: i32,
    /// The opt-in's time.
    pub opted_in_at: OffsetDateTime,
    /// Its deadline.
    pub deadline: OffsetDateTime,
    /// Trace context from the delivery.
    pub traceparent: Option<String>,
    /// The length of a lease: what the claim holds, and what the call-start mark renews.
    pub lease: Duration,
    /// When the lease runs out, on this process's clock (taken before the claim, so never
    /// later than the database's): writes for this claim are worth retrying until then.
    pub lease_end: Instant,
    /// The send slot of this row on this process's clock: its call may not start earlier.
    pub slot: Instant,
    /// The opt-in's `ref`/`payload`, which chooses a message variant.
    pub message_ref: Option<String>,
    /// Variables for the message's placeholders (empty when there are none).
    pub variables: MessageVariables,
}

/// What a claim asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// Lease owner (this replica).
    pub owner: &'a str,
    /// Lease of each claimed row.
    pub lease: Duration,
    /// Most rows to claim.
    pub limit: i64,
    /// No call starts this close to the deadline; such rows are left to `expire_overdue`.
    pub safety_margin: Duration,
    /// How far ahead of now a claimed row's slot may lie.
    pub lookahead: Duration,
    /// How many seconds of slots make room for one second's worth of calls: `1 + lateness
    /// allowed + arrival jitter allowed`. A call may start up to the lateness after its slot
    /// and still no one-second window (at Graph) holds more than the page's limit.
    pub slot_stretch: f64,
    /// How far after now an idle page's first slot lies: the time this replica needs from
    /// taking the slot to starting the call (the rest of the claim, the call-start mark).
    /// With a database some milliseconds away a slot at "now" would always have passed.
    pub slot_offset: Duration,
}

impl<'a> ClaimRequest<'a> {
    /// A request with the scheduler's defaults for everything but the owner, lease and limit
    /// (no safety margin: tests and tools that claim directly).
    pub fn new(owner: &'a str, lease: Duration, limit: i64) -> Self {
        Self {
            owner,
            lease,
            limit,
            safety_margin: Duration::ZERO,
            lookahead: DEFAULT_LOOKAHEAD,
            slot_stretch: 1.0 + SLOT_LATENESS.as_secs_f64() + ARRIVAL_JITTER.as_secs_f64(),
            slot_offset: Duration::ZERO,
        }
    }

    /// The slot spacing for a page allowed `rate` calls per second (zero: unlimited).
    pub fn slot_spacing(&self, rate: f64) -> Duration {
        if rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.slot_stretch / rate)
        }
    }
}

/// How far ahead a replica claims a page's rows by default. A claimed row holds one of the
/// replica's in-flight places while it waits for its slot, so a page with a backlog holds up
/// to this long times its rate of them: at 1 s and 250/s one page held 231 of 256 places and
/// a drain over 16 pages waited 0.5 s per send for slots (BENCHMARKS.md). The dispatcher claims
/// again every half look-ahead while sends are in flight, so a page's slots never run dry.
pub const DEFAULT_LOOKAHEAD: Duration = Duration::from_millis(250);
/// How late after its slot a call may still start (later, the slot is given up and the row
/// goes back to `pending` to be claimed again). 30 ms was too tight at the design load with
/// each service its own process: a call-start mark that waited for a busy commit came back
/// after its slot, the row went round again (a release, a claim, a mark: some 100–200 ms
/// more for that opt-in), and webhook → Graph p99 was 362 ms in `bench procs` (60 s at
/// 500 opt-ins/s); at 70 ms it was 175 and 188 ms in two runs, with no slot missed. The
/// price is in the slots' stretch (below): 4 % more of a limited page's rate.
pub const SLOT_LATENESS: Duration = Duration::from_millis(70);
/// How much the way to Graph may shift one call against another (scheduling, network).
/// 20 ms was not enough on a loaded 2-core machine: a clean-clone CI run with other builds
/// beside it saw 21 calls of a 20/s page in one second at Graph (the first call of a window
/// arriving late, the slot a second later on time). 50 ms costs 5 % of a limited page's rate.
pub const ARRIVAL_JITTER: Duration = Duration::from_millis(50);

/// The most due rows a "sparse" page's arm reads (through `optins_pending_due_by_page`, in
/// `next_attempt_at` order) to choose its earliest deadlines from.
pub const SPARSE_DUE_ROWS: i64 = 256;

/// The candidates: every page with budget within the look-ahead, and as many of its due rows
/// (deadline order) as its budget reaches; then the earliest deadlines of all of them. `$1`
/// slot stretch, `$2` look-ahead seconds, `$3` limit, `$4` safety margin seconds. Public so
/// the scale benchmark `EXPLAIN`s the very query the scheduler runs.
///
/// Per page, one of two arms runs (the other's one-time filter is false), chosen by what the
/// page's rows look like now, not by the planner's table-wide estimates (with 30 % of the
/// backlog due on a paused page it believed every page 30 % due and walked each page's whole
/// backlog in deadline order for the few new due rows: 0.6–1.4 s per claim at 1M pending).
/// A page with at most `n` (its budget) due rows is "sparse": the sparse arm reads them all
/// from the due index, and counting them read no more (the steady state: a few due rows per
/// page among many not yet due). With more, the page is "dense" when at least `n` of its
/// first `2n` pending rows in deadline order are due: its deadline index then yields its `n`
/// earliest due rows within `2n` entries, so the dense arm walks it. Otherwise due rows are
/// rare at the head of its deadline order (retries waiting out a back-off have the earliest
/// deadlines, delayed sends are not due yet) and it is sparse too: the sparse arm reads at
/// most [`SPARSE_DUE_ROWS`] of its due rows from the due index (ordered by
/// `next_attempt_at`, which no other index provides) and takes the earliest deadlines among
/// them. The checks read at most `n + 1` and `2n` index entries.
///
/// The sparse arm fetches the rows it read from the due index by their `ctid` (a TID scan):
/// looked up by `login_id` instead, the planner was free to drive the join from the page's
/// deadline index and walk every retry in back-off anyway. A row another replica updated
/// meanwhile has a new version elsewhere, and the lock's re-check (state, `ctid`) skips it,
/// as `SKIP LOCKED` skips a row still being claimed. Both arms lock under their `LIMIT`.
///
/// This replaced a count of the page's due rows (sparse up to 256, read from the due index
/// and joined back by `login_id`): over 16 pages, a page with 188 due rows read all of them
/// twice in every claim (7–14 ms per claim of 100, 20–30 ms once the table held sent rows
/// and the planner took the global indexes for that arm), and pages with 300 due rows behind
/// 5,000 retries in back-off walked all the retries (55–90 ms); 2–6 ms now (BENCHMARKS.md,
/// "The claim's two arms").
pub const CLAIM_DUE_SQL: &str = concat!(
    "WITH pages AS ( \
         SELECT p.page_id, GREATEST(p.next_slot_at, now()) AS free_from, \
                CASE WHEN p.rate_limit = 0 THEN 0::float8 \
                     ELSE $1::float8 / (p.rate_limit * p.rate_factor * a.rate_factor) END AS spacing \
         FROM page_state p CROSS JOIN app_state a \
         WHERE a.app_id = 'default' \
           AND (a.throttled_until IS NULL OR a.throttled_until <= now()) \
           AND p.paused_reason IS NULL \
           AND (p.throttled_until IS NULL OR p.throttled_until <= now()) \
           AND p.next_slot_at < now() + make_interval(secs => $2)), \
     budget AS ( \
         SELECT page_id, spacing, \
                CASE WHEN spacing = 0 THEN $3::bigint \
                     ELSE LEAST($3::bigint, 1 + floor(EXTRACT(EPOCH FROM \
                          (now() + make_interval(secs => $2) - free_from)) / spacing)::bigint) \
                END AS n \
         FROM pages), \
     room AS MATERIALIZED ( \
         SELECT page_id, spacing, n, \
                CASE WHEN (SELECT count(*) FROM ( \
                              SELECT 1 FROM optins d \
                              WHERE d.page_id = budget.page_id AND d.state = ",
    lc_shared::state_sql!(pending),
    " \
                                AND d.next_attempt_at <= now() LIMIT n + 1) due) <= n \
                     THEN true \
                     ELSE (SELECT count(*) FILTER (WHERE head.next_attempt_at <= now()) FROM ( \
                              SELECT d.next_attempt_at FROM optins d \
                              WHERE d.page_id = budget.page_id AND d.state = ",
    lc_shared::state_sql!(pending),
    " \
                                AND d.deadline > now() + make_interval(secs => $4) \
                              ORDER BY d.deadline LIMIT 2 * n) head) < n \
                END AS sparse \
         FROM budget) \
     SELECT o.page_id, o.login_id, r.spacing \
     FROM room r CROSS JOIN LATERAL ( \
         SELECT * FROM ( \
             SELECT s.page_id, s.login_id, s.deadline FROM optins s \
             WHERE r.sparse AND s.ctid = ANY (ARRAY( \
                     SELECT d.ctid FROM optins d \
                     WHERE d.page_id = r.page_id AND d.state = ",
    lc_shared::state_sql!(pending),
    " AND d.next_attempt_at <= now() \
                     ORDER BY d.next_attempt_at LIMIT 256)) \
               AND s.state = ",
    lc_shared::state_sql!(pending),
    " AND s.next_attempt_at <= now() \
               AND s.deadline > now() + make_interval(secs => $4) \
             ORDER BY s.deadline LIMIT r.n \
             FOR UPDATE OF s SKIP LOCKED) sparse_arm \
         UNION ALL \
         SELECT * FROM ( \
             SELECT page_id, login_id, deadline FROM optins \
             WHERE NOT r.sparse AND page_id = r.page_id AND state = ",
    lc_shared::state_sql!(pending),
    " AND next_attempt_at <= now() \
               AND deadline > now() + make_interval(secs => $4) \
             ORDER BY deadline LIMIT r.n \
             FOR UPDATE SKIP LOCKED) dense_arm) o \
     ORDER BY o.deadline \
     LIMIT $3"
);

/// Planner settings of the claim's transaction. The per-page walk reads a few rows of each
/// page through `optins_pending_by_page`, which costs random heap reads; at PostgreSQL's
/// default `random_page_cost` (4, priced for spinning disks) the planner prefers walking the
/// global `optins_pending_by_deadline` index and filtering by page, which reads every page's
/// rows for each page: with 16 pages of equal backlog, 16× the rows, and 110–330 ms per claim
/// of 64 rows against 3–8 ms (measured on 100,000 due rows; BENCHMARKS.md, drain). 1.1 is
/// the usual figure for SSD storage, which managed PostgreSQL services use; `LOCAL` keeps it
/// to this transaction.
pub const CLAIM_PLANNER_SQL: &str = "SET LOCAL random_page_cost = 1.1";

/// Runs [`CLAIM_DUE_SQL`], prefixed by `prefix` (`""`, or `"EXPLAIN "` for
/// [`explain_claim`]), in `tx` under [`CLAIM_PLANNER_SQL`], the two statements pipelined.
async fn candidates(
    tx: &deadpool_postgres::Transaction<'_>,
    request: &ClaimRequest<'_>,
    prefix: &str,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let sql = format!("{prefix}{CLAIM_DUE_SQL}");
    let lookahead = request.lookahead.as_secs_f64();
    let margin = request.safety_margin.as_secs_f64();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&request.slot_stretch, &lookahead, &request.limit, &margin];
    let (_, rows) = futures_util::try_join!(
        tx.batch_execute(CLAIM_PLANNER_SQL),
        tx.query(sql.as_str(), &params)
    )?;
    Ok(rows)
}

/// The plan PostgreSQL picks for the claim's candidate query, exactly as [`claim_due`] runs
/// it (same settings, same parameters), one line per plan line; nothing is claimed. For tests
/// and benchmarks that check the per-page walk uses `optins_pending_by_page`.
pub async fn explain_claim(
    client: &mut Client,
    request: &ClaimRequest<'_>,
) -> Result<Vec<String>, StoreError> {
    explain_with(client, request, "EXPLAIN ").await
}

/// As [`explain_claim`], with the query run (`EXPLAIN (ANALYZE, TIMING OFF)`): the rows
/// each step read and filtered out, so tests can tell how much of a page a claim walked.
/// Run in a transaction that is rolled back, so nothing stays claimed or locked.
pub async fn explain_analyze_claim(
    client: &mut Client,
    request: &ClaimRequest<'_>,
) -> Result<Vec<String>, StoreError> {
    explain_with(client, request, "EXPLAIN (ANALYZE, TIMING OFF) ").await
}

/// The claim's candidate query under `explain` (an `EXPLAIN …` prefix), in a transaction
/// that is rolled back; one line per plan line.
async fn explain_with(
    client: &mut Client,
    request: &ClaimRequest<'_>,
    explain: &str,
) -> Result<Vec<String>, StoreError> {
    let tx = client.transaction().await?;
    let rows = candidates(&tx, request, explain).await?;
    tx.rollback().await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// Takes `$2` slots of `$3` seconds each from page `$1`, the first no earlier than `$4`
/// seconds from now; returns the seconds from now to the page's new next free slot (the taken
/// slots lie just before it). "Now" is the statement's own clock, not the transaction's
/// start, so the caller can map it onto its clock right after the answer.
const TAKE_SLOTS_SQL: &str = "UPDATE page_state \
     SET next_slot_at = GREATEST(next_slot_at, clock_timestamp() + make_interval(secs => $4::float8)) \
             + make_interval(secs => $2::float8 * $3::float8), \
         updated_at = now() \
     WHERE page_id = $1 \
     RETURNING EXTRACT(EPOCH FROM (next_slot_at - clock_timestamp()))::float8";

/// Moves the chosen rows to `sending` under this owner's lease.
const LEASE_SQL: &str = concat!(
    "UPDATE optins o SET state = ",
    lc_shared::state_sql!(sending),
    ", lease_owner = $1, \
         lease_expires_at = now() + make_interval(secs => $2), fence = o.fence + 1, \
         call_started_at = NULL, claimed_at = now(), updated_at = now() \
     FROM unnest($3::text[], $4::text[]) AS c(page_id, login_id) \
     WHERE o.page_id = c.page_id AND o.login_id = c.login_id \
     RETURNING o.page_id, o.login_id, o.fence, o.attempts, o.opted_in_at, o.deadline, \
         o.traceparent, o.message_ref, o.variables"
);

/// The stored variables of a claimed row. One that does not read back (edited by hand)
/// costs the personalisation, never the first message: the variant's default text is sent.
fn stored_variables(row: &tokio_postgres::Row) -> MessageVariables {
    match row.try_get::<_, Option<Json<MessageVariables>>>(8) {
        Ok(v) => v.map(|Json(v)| v).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "stored optins.variables cannot be read; sending without them");
            MessageVariables::default()
        }
    }
}

/// One candidate row and its page's slot spacing.
struct Candidate {
    page_id: String,
    login_id: String,
    spacing: f64,
}

/// Claims up to `request.limit` due opt-ins with their send slots (see the module doc),
/// earliest deadline first, skipping rows other replicas hold. Returned in deadline order.
pub async fn claim_due(
    client: &mut Client,
    request: &ClaimRequest<'_>,
) -> Result<Vec<Claimed>, StoreError> {
    let lease_secs = request.lease.as_secs_f64();
    // Taken before the transaction starts, so `now()` in it is never earlier: slot and lease
    // instants derived from it are on the safe side.
    let base = Instant::now();
    let lease_end = base + request.lease;
    let tx = client.transaction().await?;
    let rows = candidates(&tx, request, "").await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let candidates: Vec<Candidate> = rows
        .iter()
        .map(|r| Candidate {
            page_id: r.get(0),
            login_id: r.get(1),
            spacing: r.get(2),
        })
        .collect();
    // Rows of one page, in deadline order; pages in key order, so two replicas take page
    // locks in the same order and never deadlock.
    let mut by_page: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        by_page.entry(c.page_id.as_str()).or_default().push(i);
    }
    let take = tx.prepare_cached(TAKE_SLOTS_SQL).await?;
    let offset = request.slot_offset.as_secs_f64();
    let (tx_ref, take_ref, offset_ref) = (&tx, &take, &offset);
    // Issued together, the statements are pipelined and run in issue order.
    let starts = futures_util::future::try_join_all(by_page.iter().map(|(page, rows)| {
        let spacing = candidates[rows[0]].spacing;
        let count = rows.len() as f64;
        async move {
            if spacing <= 0.0 {
                return Ok::<f64, tokio_postgres::Error>(0.0);
            }
            let next: f64 = tx_ref
                .query_one(take_ref, &[page, &count, &spacing, offset_ref])
                .await?
                .get(0);
            Ok(next - count * spacing)
        }
    }))
    .await?;
    // The delays are from the moment each statement ran: mapped from just after the answers
    // arrived, a slot is late by at most that round trip (within the lateness allowed) and
    // never early (early slots would crowd the page's one-second windows).
    let answered = Instant::now();
    let mut slot_of = vec![answered; candidates.len()];
    for ((_, rows), start) in by_page.iter().zip(&starts) {
        for (k, &i) in rows.iter().enumerate() {
            let delay = start + k as f64 * candidates[i].spacing;
            slot_of[i] = answered + Duration::try_from_secs_f64(delay).unwrap_or(Duration::ZERO);
        }
    }
    let pages: Vec<&str> = candidates.iter().map(|c| c.page_id.as_str()).collect();
    let logins: Vec<&str> = candidates.iter().map(|c| c.login_id.as_str()).collect();
    let leased = tx
        .query(LEASE_SQL, &[&request.owner, &lease_secs, &pages, &logins])
        .await?;
    tx.commit().await?;
    let index: std::collections::HashMap<(&str, &str), usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| ((c.page_id.as_str(), c.login_id.as_str()), i))
        .collect();
    let mut claimed: Vec<Claimed> = leased
        .iter()
        .map(|r| {
            let (page_id, login_id): (String, String) = (r.get(0), r.get(1));
            let slot = index
                .get(&(page_id.as_str(), login_id.as_str()))
                .map_or(answered, |&i| slot_of[i]);
            Claimed {
                page_id,
                login_id,
                fence: r.get(2),
                attempts: r.get(3),
                opted_in_at: r.get(4),
                deadline: r.get(5),
                traceparent: r.get(6),
                lease: request.lease,
                lease_end,
                slot,
                message_ref: r.try_get(7).ok().flatten(),
                variables: stored_variables(r),
            }
        })
        .collect();
    // UPDATE … RETURNING does not keep the candidates' order.
    claimed.sort_by_key(|c| c.deadline);
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_sql_uses_the_sparse_bound() {
        // concat! takes literals only, so the bound is written out in the SQL.
        let part = format!("ORDER BY d.next_attempt_at LIMIT {SPARSE_DUE_ROWS})");
        assert!(CLAIM_DUE_SQL.contains(&part), "missing {part:?}");
    }
}
