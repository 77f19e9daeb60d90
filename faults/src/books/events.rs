//! The public events against the tables and the capture queue, and the queues at the end.

use std::collections::{HashMap, HashSet};

use super::{Check, Key, OutboxRow, Snapshot};

/// The outbox against the tables and against what the capture queue received.
pub(super) fn event_checks(s: &Snapshot) -> Vec<Check> {
    let mut per_key: HashMap<(&Key, &str), usize> = HashMap::new();
    for e in &s.outbox {
        *per_key.entry((&e.key, e.event_type.as_str())).or_default() += 1;
    }
    let count = |key: &Key, ty: &str| per_key.get(&(key, ty)).copied().unwrap_or(0);
    let mut problems = Vec::new();
    for (key, row) in &s.optins {
        for ty in ["sent", "failed", "expired"] {
            let expected = usize::from(row.state == ty);
            let n = count(key, &format!("first_message.{ty}"));
            if n != expected {
                problems.push(format!(
                    "{} is {} but has {n} first_message.{ty} events",
                    key.1, row.state
                ));
            }
        }
    }
    for key in s.links.keys() {
        let n = count(key, "identity.linked");
        if n != 1 {
            problems.push(format!("link of {} has {n} identity.linked events", key.1));
        }
    }
    let mut orphans = Vec::new();
    for e in &s.outbox {
        let backed = match e.event_type.strip_prefix("first_message.") {
            Some(state) => s.optins.get(&e.key).is_some_and(|r| r.state == state),
            None => e.event_type == "identity.linked" && s.links.contains_key(&e.key),
        };
        if !backed {
            orphans.push(format!(
                "outbox event {} ({}) for {} has no matching change",
                e.event_id, e.event_type, e.key.1
            ));
        }
    }
    let outbox_ids: HashMap<&str, &OutboxRow> =
        s.outbox.iter().map(|e| (e.event_id.as_str(), e)).collect();
    let captured_ids: HashSet<&str> = s.captured.iter().map(|c| c.id.as_str()).collect();
    let unpublished: Vec<String> = s
        .outbox
        .iter()
        .filter(|e| !e.published || !captured_ids.contains(e.event_id.as_str()))
        .map(|e| {
            format!(
                "{} ({}, {}) published={} but never received",
                e.event_id, e.event_type, e.key.1, e.published
            )
        })
        .collect();
    let mut strays = Vec::new();
    for c in &s.captured {
        match outbox_ids.get(c.id.as_str()) {
            None => strays.push(format!(
                "received event {} ({}) that no committed change wrote",
                c.id, c.event_type
            )),
            Some(row) if row.event_type != c.event_type || row.key != c.key => {
                strays.push(format!(
                    "received event {} differs from its outbox row",
                    c.id
                ));
            }
            Some(_) => {}
        }
    }
    orphans.extend(strays);
    vec![
        Check::new(
            "every committed state change has exactly one event in the outbox",
            problems,
            format!("{} outbox events", s.outbox.len()),
        ),
        Check::new(
            "every outbox event was published and received",
            unpublished,
            format!(
                "{} received ({} unique, {} redelivered by the at-least-once relay)",
                s.captured.len(),
                captured_ids.len(),
                s.captured.len() - captured_ids.len()
            ),
        ),
        Check::new(
            "no event without its change",
            orphans,
            "each received id is an outbox row with a matching row in optins/links".into(),
        ),
    ]
}

/// The dead-letter, unparsed and work queues at the end.
pub(super) fn dead_letters(s: &Snapshot) -> Check {
    let mut problems = Vec::new();
    let mut idle = Vec::new();
    for q in [
        "scheduler.optins.dlq",
        "correlator.replies.dlq",
        "messenger.unparsed",
    ] {
        let n = s.depths.get(q).copied().unwrap_or(0);
        if n > 0 {
            problems.push(format!("{q} holds {n} messages"));
        }
    }
    for q in ["scheduler.optins", "correlator.replies"] {
        let n = s.depths.get(q).copied().unwrap_or(0);
        if n > 0 {
            idle.push(format!("{q} still holds {n} messages"));
        }
    }
    problems.extend(idle);
    Check::new(
        "work queues drained, nothing dead-lettered",
        problems,
        "scheduler.optins, correlator.replies, their .dlq, messenger.unparsed".into(),
    )
}
