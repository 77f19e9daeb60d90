//! The books: after the system settled, what was acknowledged, stored, sent and announced
//! must balance. Each check prints `PASS` or `FAIL` with its evidence; violations of "at most
//! one message" come with their timeline (calls, row, faults around them).

use std::collections::{HashMap, HashSet};

use lc_testkit::fake_graph::{RecordedCall, TokenSource};
use serde_json::Value;
use time::OffsetDateTime;

use crate::chaos::Timeline;
use crate::workload::{ItemRef, OptinKind, Plan, PostResults};

pub mod cluster;
mod counts;
mod events;
mod scale;

use counts::{counts, timeline_of};
use events::{dead_letters, event_checks};

/// `(page_id, login_id)`.
type Key = (String, String);

/// One `optins` row.
#[derive(Debug, Clone)]
pub struct OptinRow {
    /// Its state.
    pub state: String,
    /// `failure_reason`.
    pub failure_reason: Option<String>,
    /// Send API calls it counted.
    pub attempts: i32,
    /// Its deadline.
    pub deadline: OffsetDateTime,
    /// Whether its last claim marked the call as started (`call_started_at`).
    pub call_started: bool,
    /// When the row was recorded (`created_at`).
    pub created_at: OffsetDateTime,
    /// Its fence: how many times it was claimed.
    pub fence: i64,
}

/// One outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// The CloudEvent id.
    pub event_id: String,
    /// Routing key, e.g. `first_message.sent`.
    pub event_type: String,
    /// The key it is about.
    pub key: Key,
    /// Whether the relay marked it published.
    pub published: bool,
}

/// One event taken from the capture queue.
#[derive(Debug, Clone)]
pub struct Captured {
    /// CloudEvent id.
    pub id: String,
    /// Routing key derived from the CloudEvent type.
    pub event_type: String,
    /// The key it is about.
    pub key: Key,
}

/// Everything the checks look at.
pub struct Snapshot {
    /// `optins` by key.
    pub optins: HashMap<Key, OptinRow>,
    /// `links`: key → psid.
    pub links: HashMap<Key, String>,
    /// The outbox.
    pub outbox: Vec<OutboxRow>,
    /// Captured public events (with at-least-once duplicates).
    pub captured: Vec<Captured>,
    /// Every call the fake Graph received.
    pub calls: Vec<RecordedCall>,
    /// Queue depths of the vhost at the end.
    pub depths: HashMap<String, u64>,
}

impl Snapshot {
    /// Reads the tables.
    pub async fn load(
        sql: &tokio_postgres::Client,
        captured: Vec<Vec<u8>>,
        calls: Vec<RecordedCall>,
        depths: HashMap<String, u64>,
    ) -> anyhow::Result<Self> {
        let mut optins = HashMap::new();
        for r in sql
            .query(
                "SELECT page_id, login_id, state, failure_reason, attempts, deadline, \
                        call_started_at IS NOT NULL, created_at, fence FROM optins",
                &[],
            )
            .await?
        {
            optins.insert(
                (r.get(0), r.get(1)),
                OptinRow {
                    state: r.get(2),
                    failure_reason: r.get(3),
                    attempts: r.get(4),
                    deadline: r.get(5),
                    call_started: r.get(6),
                    created_at: r.get(7),
                    fence: r.get(8),
                },
            );
        }
        let links = sql
            .query("SELECT page_id, login_id, psid FROM links", &[])
            .await?
            .into_iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        let outbox = sql
            .query(
                // The public events (about a person); operational events (page.*,
                // subscription.*) have no person and are not what the books check.
                "SELECT event_id::text, event_type, page_id, cloudevent->'data'->>'login_id', \
                 published_at IS NOT NULL FROM outbox WHERE cloudevent->'data' ? 'login_id'",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| OutboxRow {
                event_id: r.get(0),
                event_type: r.get(1),
                key: (r.get(2), r.get::<_, Option<String>>(3).unwrap_or_default()),
                published: r.get(4),
            })
            .collect();
        // Operational events carry no `data.login_id` and are left out, like their rows.
        let captured = captured
            .iter()
            .filter_map(|body| {
                let v: Value = serde_json::from_slice(body).ok()?;
                let ty = v.get("type")?.as_str()?;
                Some(Captured {
                    id: v.get("id")?.as_str()?.to_owned(),
                    event_type: ty
                        .strip_prefix("com.loginconnect.")
                        .unwrap_or(ty)
                        .to_owned(),
                    key: (
                        v.pointer("/data/page_id")?.as_str()?.to_owned(),
                        v.pointer("/data/login_id")?.as_str()?.to_owned(),
                    ),
                })
            })
            .collect();
        Ok(Self {
            optins,
            links,
            outbox,
            captured,
            calls,
            depths,
        })
    }
}

/// The result of one check.
pub struct Check {
    /// What it checks.
    pub name: &'static str,
    /// Violations (empty: passed).
    pub problems: Vec<String>,
    /// What it counted.
    pub detail: String,
}

/// How many problem lines a failed check prints.
const SHOW: usize = 10;

impl Check {
    fn new(name: &'static str, problems: Vec<String>, detail: String) -> Self {
        Self {
            name,
            problems,
            detail,
        }
    }

    /// Prints `PASS`/`FAIL` with the evidence.
    pub fn print(&self) {
        let verdict = if self.problems.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        println!("{verdict} {}: {}", self.name, self.detail);
        for p in self.problems.iter().take(SHOW) {
            println!("     - {p}");
        }
        if self.problems.len() > SHOW {
            println!("     … and {} more", self.problems.len() - SHOW);
        }
    }
}

/// What the books need besides the snapshot.
pub struct Context<'a> {
    /// The load.
    pub plan: &'a Plan,
    /// What ingest answered.
    pub posted: &'a PostResults,
    /// The faults.
    pub timeline: &'a Timeline,
    /// When the run started (to put calls on the timeline).
    pub run_start: OffsetDateTime,
    /// The schedulers' safety margin.
    pub margin: time::Duration,
    /// Slack for the arrival of a call at the fake after the scheduler's last check.
    pub tolerance: time::Duration,
    /// `UNKNOWN_OUTCOME=retry`: crash-window duplicates are allowed (and counted).
    pub retry_policy: bool,
    /// Process exits the suite did not cause.
    pub unexpected_exits: &'a [String],
    /// The schedulers' `PAGE_RATE_LIMIT`, if the run set one (the per-page rate check).
    pub page_rate_limit: Option<u32>,
    /// The page carrying most opt-ins, if the load is skewed (the small-page wait check).
    pub big_page: Option<&'a str>,
    /// Every page the schedulers know.
    pub known_pages: &'a [String],
    /// Longest a small page's opt-in may wait for its first call.
    pub small_wait_bound: time::Duration,
    /// `scheduler_slots_missed_total` summed over the schedulers running at the end.
    pub slots_missed: Option<f64>,
}

const TERMINAL: [&str; 4] = ["sent", "replied", "failed", "expired"];

/// Runs every check.
pub fn check(ctx: &Context<'_>, s: &Snapshot) -> (Vec<Check>, Vec<String>) {
    let mut acked_optins: HashSet<usize> = HashSet::new();
    let mut acked_replies: HashSet<usize> = HashSet::new();
    for (k, d) in ctx.plan.deliveries.iter().enumerate() {
        if ctx.posted.acked.get(k).copied().unwrap_or(false) {
            for item in &d.items {
                match item {
                    ItemRef::Optin(i) => acked_optins.insert(*i),
                    ItemRef::Reply(j) => acked_replies.insert(*j),
                };
            }
        }
    }
    let sends: Vec<&RecordedCall> = s.calls.iter().filter(|c| c.is_send()).collect();
    let mut ok_calls: HashMap<Key, Vec<&RecordedCall>> = HashMap::new();
    let mut all_calls: HashMap<Key, Vec<&RecordedCall>> = HashMap::new();
    for c in &sends {
        let key = (c.page_id.clone(), c.login_id.clone().unwrap_or_default());
        all_calls.entry(key.clone()).or_default().push(c);
        if c.outcome == "ok" {
            ok_calls.entry(key).or_default().push(c);
        }
    }
    let mut checks = Vec::new();

    checks.push(Check::new(
        "processes exit only when killed",
        ctx.unexpected_exits.to_vec(),
        format!("{} unexpected exits", ctx.unexpected_exits.len()),
    ));

    // Every acknowledged opt-in has a row in a terminal state fitting its kind.
    let mut problems = Vec::new();
    let mut unfit = Vec::new();
    for i in &acked_optins {
        let o = &ctx.plan.optins[*i];
        let key = (o.page.clone(), o.login_id.clone());
        match s.optins.get(&key) {
            None => problems.push(format!(
                "opt-in {} of page {} acknowledged but never recorded",
                o.login_id, o.page
            )),
            Some(row) if !TERMINAL.contains(&row.state.as_str()) => {
                problems.push(format!(
                    "opt-in {} of page {} still {}",
                    o.login_id, o.page, row.state
                ));
            }
            Some(row) => {
                let reason = row.failure_reason.as_deref().unwrap_or("");
                let fits = row.state == "replied"
                    || match o.kind {
                        OptinKind::Fresh => row.state == "sent" || reason == "outcome_unknown",
                        OptinKind::NearDeadline => {
                            row.state != "failed" || reason == "outcome_unknown"
                        }
                        OptinKind::Stale => row.state == "expired",
                        OptinKind::UnknownPage => reason == "unknown_page",
                    };
                if !fits {
                    unfit.push(format!(
                        "{:?} opt-in {} ended {} ({reason}) after {} attempts",
                        o.kind, o.login_id, row.state, row.attempts
                    ));
                }
            }
        }
    }
    checks.push(Check::new(
        "every acknowledged opt-in is in a terminal state",
        problems,
        format!(
            "{} acknowledged opt-ins, {} rows",
            acked_optins.len(),
            s.optins.len()
        ),
    ));
    checks.push(Check::new(
        "terminal states fit the opt-ins",
        unfit,
        "fresh→sent, stale→expired, unknown page→failed, any→replied or failed(outcome_unknown)"
            .into(),
    ));

    // At most one message per login_id.
    let mut problems = Vec::new();
    let mut allowed = 0;
    for (key, calls) in &ok_calls {
        if calls.len() <= 1 {
            continue;
        }
        if ctx.retry_policy {
            allowed += 1;
        }
        problems.push(timeline_of(ctx, s, key, &all_calls));
    }
    let max = ok_calls.values().map(Vec::len).max().unwrap_or(0);
    let detail = format!(
        "{} login_ids messaged, most messages to one: {max}{}",
        ok_calls.len(),
        if ctx.retry_policy {
            format!("; {allowed} duplicates allowed by UNKNOWN_OUTCOME=retry")
        } else {
            String::new()
        }
    );
    checks.push(Check::new(
        "at most one message per login_id",
        if ctx.retry_policy {
            Vec::new()
        } else {
            problems.clone()
        },
        detail,
    ));
    if ctx.retry_policy {
        for p in problems.iter().take(SHOW) {
            println!("     (allowed by policy) {p}");
        }
    }

    // Every message Graph accepted is recorded: sent, or failed by the crash-window policy.
    let mut problems = Vec::new();
    for (key, calls) in &ok_calls {
        let state = s
            .optins
            .get(key)
            .map(|r| (r.state.as_str(), r.failure_reason.as_deref()));
        match state {
            Some(("sent", _)) | Some(("failed", Some("outcome_unknown"))) => {}
            Some(("pending", _)) if ctx.retry_policy => {}
            other => problems.push(format!(
                "{} got {} message(s) but its opt-in is {:?}: {}",
                key.1,
                calls.len(),
                other,
                timeline_of(ctx, s, key, &all_calls)
            )),
        }
    }
    for (key, row) in &s.optins {
        if row.state == "sent" && !ok_calls.contains_key(key) {
            problems.push(format!(
                "{} recorded sent but Graph accepted no call",
                key.1
            ));
        }
    }
    checks.push(Check::new(
        "every accepted message is recorded as sent (or as the crash-window policy says)",
        problems,
        format!(
            "{} rows sent",
            s.optins.values().filter(|r| r.state == "sent").count()
        ),
    ));

    // An unknown outcome only where a call had started: a worker that died before calling
    // leaves a safe retry, not a person who never gets a message.
    let unknown: Vec<(&Key, &OptinRow)> = s
        .optins
        .iter()
        .filter(|(_, r)| r.failure_reason.as_deref() == Some("outcome_unknown"))
        .collect();
    let problems: Vec<String> = unknown
        .iter()
        .filter(|(_, r)| !r.call_started)
        .map(|(key, _)| {
            format!(
                "{} failed outcome_unknown although no call had started: {}",
                key.1,
                timeline_of(ctx, s, key, &all_calls)
            )
        })
        .collect();
    let unreached = unknown
        .iter()
        .filter(|(key, _)| !all_calls.contains_key(*key))
        .count();
    checks.push(Check::new(
        "an unknown outcome only after the call started",
        problems,
        format!(
            "{} opt-ins failed outcome_unknown, {unreached} of them without a call reaching Graph (died between the mark and the request)",
            unknown.len()
        ),
    ));

    // No call at or after deadline − margin.
    let mut problems = Vec::new();
    let mut closest: Option<time::Duration> = None;
    for c in &sends {
        let key = (c.page_id.clone(), c.login_id.clone().unwrap_or_default());
        match s.optins.get(&key) {
            None => problems.push(format!(
                "call for {} of page {} that has no opt-in row",
                key.1, key.0
            )),
            Some(row) => {
                let last = row.deadline - ctx.margin;
                let slack = last - c.at;
                closest = Some(closest.map_or(slack, |m| m.min(slack)));
                if c.at >= last + ctx.tolerance {
                    problems.push(format!(
                        "{} called {:.3}s after its last send time",
                        key.1,
                        (c.at - last).as_seconds_f64()
                    ));
                }
            }
        }
    }
    checks.push(Check::new(
        "no call at or after deadline minus margin",
        problems,
        format!(
            "{} calls; least time left before the last send time at a call's arrival: {} (arrivals up to {:.1}s late count as transport delay)",
            sends.len(),
            closest.map_or("-".into(), |d| format!("{:.3}s", d.as_seconds_f64())),
            ctx.tolerance.as_seconds_f64()
        ),
    ));

    // Replies.
    let mut problems = Vec::new();
    let mut with_prior = 0;
    for j in &acked_replies {
        let r = &ctx.plan.replies[*j];
        let Some(login_id) = &r.login_id else {
            continue;
        };
        with_prior += 1;
        match s.links.get(&(r.page.clone(), login_id.clone())) {
            None => problems.push(format!(
                "reply {} names {login_id} but no link exists",
                r.mid
            )),
            Some(psid) if *psid != r.psid => {
                problems.push(format!("{login_id} linked to {psid}, expected {}", r.psid))
            }
            Some(_) => {}
        }
    }
    checks.push(Check::new(
        "every acknowledged reply with prior_message has its link",
        problems,
        format!(
            "{} acknowledged replies ({with_prior} with prior_message), {} links",
            acked_replies.len(),
            s.links.len()
        ),
    ));

    checks.extend(scale::page_rate(ctx, &sends));
    checks.extend(scale::small_page_wait(ctx, s, &all_calls));
    checks.extend(scale::token_taken_up(ctx, s, &sends));

    checks.extend(event_checks(s));
    checks.push(dead_letters(s));

    let problems: Vec<String> = s
        .calls
        .iter()
        .filter(|c| c.token_source != Some(TokenSource::Header) || c.query.contains("access_token"))
        .map(|c| {
            format!(
                "{} {} carried its token in {:?}",
                c.method, c.path, c.token_source
            )
        })
        .collect();
    checks.push(Check::new(
        "page tokens only in the Authorization header",
        problems,
        format!("{} Graph calls", s.calls.len()),
    ));

    (
        checks,
        counts(ctx, s, &acked_optins, &sends, &ok_calls, &all_calls),
    )
}
