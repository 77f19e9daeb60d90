//! The report: counts of everything, and the timeline of one login_id for a violation.

use std::collections::{HashMap, HashSet};

use lc_testkit::fake_graph::RecordedCall;
use time::OffsetDateTime;

use super::{Context, Key, Snapshot};

/// The calls for one key, its row, and the faults around them.
pub(super) fn timeline_of(
    ctx: &Context<'_>,
    s: &Snapshot,
    key: &Key,
    all: &HashMap<Key, Vec<&RecordedCall>>,
) -> String {
    let rel = |t: OffsetDateTime| (t - ctx.run_start).as_seconds_f64();
    let calls = all.get(key).cloned().unwrap_or_default();
    let mut parts: Vec<String> = calls
        .iter()
        .map(|c| format!("call@{:.2}s→{}", rel(c.at), c.outcome))
        .collect();
    if let Some(row) = s.optins.get(key) {
        parts.push(format!(
            "row {} ({}) attempts {}",
            row.state,
            row.failure_reason.as_deref().unwrap_or("-"),
            row.attempts
        ));
    }
    let mut cause = "";
    let first_ok = calls.iter().find(|c| c.outcome == "ok").map(|c| rel(c.at));
    if let (Some(first), Some(last)) = (calls.first(), calls.last()) {
        let (lo, hi) = (rel(first.at) - 10.0, rel(last.at) + 5.0);
        for (at, what) in &ctx.timeline.entries {
            if *at >= lo && *at <= hi {
                parts.push(format!("fault@{at:.2}s {what}"));
            }
            // A hang injected just before the first call: that call was processed by Graph
            // but its answer came after the client's timeout, and the client retried.
            if what.contains("hang")
                && first_ok.is_some_and(|ok| *at <= ok + 0.05 && *at >= ok - 5.0)
            {
                cause = " — likely cause: the first call hung past GRAPH_TIMEOUT_MS, Graph delivered it, the scheduler classified the timeout as transient and called again";
            }
        }
    }
    format!("{} [{}]{cause}", key.1, parts.join("; "))
}

/// One line per kind of count.
pub(super) fn counts(
    ctx: &Context<'_>,
    s: &Snapshot,
    acked_optins: &HashSet<usize>,
    sends: &[&RecordedCall],
    ok_calls: &HashMap<Key, Vec<&RecordedCall>>,
    all: &HashMap<Key, Vec<&RecordedCall>>,
) -> Vec<String> {
    let mut lines = Vec::new();
    let acked = ctx.posted.acked.iter().filter(|a| **a).count();
    let redeliveries = ctx.plan.deliveries.iter().filter(|d| d.redelivery).count();
    let mut statuses: Vec<_> = ctx.posted.statuses.iter().collect();
    statuses.sort();
    lines.push(format!(
        "deliveries: {} posted ({redeliveries} verbatim redeliveries), {acked} answered 200, {} retried posts; answers {statuses:?}",
        ctx.plan.deliveries.len(),
        ctx.posted.retries
    ));
    let mut by_kind: HashMap<String, usize> = HashMap::new();
    for i in acked_optins {
        *by_kind
            .entry(format!("{:?}", ctx.plan.optins[*i].kind))
            .or_default() += 1;
    }
    let mut by_kind: Vec<_> = by_kind.into_iter().collect();
    by_kind.sort();
    lines.push(format!(
        "opt-ins: {} planned, {} acknowledged {by_kind:?}; replies: {} planned",
        ctx.plan.optins.len(),
        acked_optins.len(),
        ctx.plan.replies.len()
    ));
    let mut states: HashMap<String, usize> = HashMap::new();
    for r in s.optins.values() {
        let label = match &r.failure_reason {
            Some(reason) => format!("{}({reason})", r.state),
            None => r.state.clone(),
        };
        *states.entry(label).or_default() += 1;
    }
    let mut states: Vec<_> = states.into_iter().collect();
    states.sort();
    lines.push(format!(
        "opt-in rows: {} {states:?}; links: {}",
        s.optins.len(),
        s.links.len()
    ));
    let mut events: HashMap<&str, usize> = HashMap::new();
    for e in &s.outbox {
        *events.entry(e.event_type.as_str()).or_default() += 1;
    }
    let mut events: Vec<_> = events.into_iter().collect();
    events.sort();
    lines.push(format!(
        "outbox events: {} {events:?}; received: {}",
        s.outbox.len(),
        s.captured.len()
    ));
    let mut outcomes: HashMap<&str, usize> = HashMap::new();
    for c in sends {
        let label = if c.outcome.starts_with("error:") {
            c.outcome.as_str()
        } else {
            "ok"
        };
        *outcomes.entry(label).or_default() += 1;
    }
    let mut outcomes: Vec<_> = outcomes.into_iter().collect();
    outcomes.sort();
    lines.push(format!(
        "send calls: {} {outcomes:?}; login_ids messaged: {}",
        sends.len(),
        ok_calls.len()
    ));
    let unknown: Vec<&Key> = s
        .optins
        .iter()
        .filter(|(_, r)| r.failure_reason.as_deref() == Some("outcome_unknown"))
        .map(|(k, _)| k)
        .collect();
    let delivered = unknown
        .iter()
        .filter(|k| ok_calls.contains_key(**k))
        .count();
    let called = unknown.iter().filter(|k| all.contains_key(**k)).count();
    lines.push(format!(
        "unknown outcomes (crash window, lost answers; UNKNOWN_OUTCOME={}): {} opt-ins failed outcome_unknown: {delivered} had a message Graph accepted (person messaged, recorded failed), {} had a call without a message, {} had no call at all",
        if ctx.retry_policy { "retry" } else { "fail" },
        unknown.len(),
        called - delivered,
        unknown.len() - called
    ));
    let most_claimed = s.optins.iter().max_by_key(|(_, r)| r.fence);
    let reclaimed = s.optins.values().filter(|r| r.fence > 20).count();
    lines.push(format!(
        "claims: most claims of one opt-in {}; {reclaimed} opt-ins claimed more than 20 times; send slots missed (scheduler_slots_missed_total of the schedulers running at the end): {}",
        most_claimed.map_or("-".into(), |(k, r)| format!(
            "{} ({} of page {}, {} after {} calls)",
            r.fence, k.1, k.0, r.state, all.get(k).map_or(0, Vec::len)
        )),
        ctx.slots_missed
            .map_or("-".into(), |n| format!("{n:.0}"))
    ));
    let faults: Vec<String> = ctx
        .timeline
        .counts
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect();
    lines.push(format!("faults injected: {}", faults.join(", ")));
    lines
}
