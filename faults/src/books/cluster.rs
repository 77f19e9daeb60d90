//! The books of the cluster mode (`--cluster`): the quorum queues' members on every node, both
//! node kills done and healed, ingest on another node after its own died, and how long
//! ingest answered anything but 200 after each kill (the figures the README quotes).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::Check;
use crate::cluster::{ClusterRecord, NODES, Victim};

/// Longest ingest may answer anything but 200 after a node kill: the time to notice the lost
/// connection, connect to the next node and for the queues to elect new leaders, with room
/// for a loaded machine. Beyond it the failover is broken, not slow. The bound is also never
/// longer than the node's downtime: publishes that recover only when the dead node is back
/// did not fail over.
pub const FAILOVER_BOUND: Duration = Duration::from_secs(30);

/// How long publishes failed after one kill.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureWindow {
    /// Answers other than 200 from the kill to the next kill (or the end).
    pub answers: usize,
    /// From the kill to the last of them (zero: none).
    pub last_after: Duration,
}

/// The answers other than 200 in `[from, until)`, and how long after `from` the last came.
pub fn failure_window(
    failures: &[Instant],
    from: Instant,
    until: Option<Instant>,
) -> FailureWindow {
    let inside: Vec<Instant> = failures
        .iter()
        .copied()
        .filter(|t| *t >= from && until.is_none_or(|u| *t < u))
        .collect();
    FailureWindow {
        answers: inside.len(),
        last_after: inside
            .iter()
            .max()
            .map_or(Duration::ZERO, |t| t.duration_since(from)),
    }
}

/// The cluster mode's checks, and the figures for the counts section.
pub fn cluster_checks(record: &ClusterRecord, failures: &[Instant]) -> (Vec<Check>, Vec<String>) {
    let mut checks = Vec::new();
    let mut figures = Vec::new();

    // Every quorum queue has a member on each node (RabbitMQ's default group size).
    let all: BTreeSet<&str> = record.nodes.iter().map(String::as_str).collect();
    let mut problems = Vec::new();
    if record.members.is_empty() {
        problems.push("no quorum queue listed".to_owned());
    }
    for (queue, members) in &record.members {
        let on: BTreeSet<&str> = members.iter().map(String::as_str).collect();
        if on.len() < NODES || !on.is_subset(&all) {
            problems.push(format!(
                "{queue} has members on {on:?}, not on the {NODES} nodes"
            ));
        }
    }
    checks.push(Check::new(
        "every quorum queue has a member on each of the cluster's nodes",
        problems,
        format!(
            "{} quorum queues on {} nodes",
            record.members.len(),
            record.nodes.len()
        ),
    ));

    // Both kills happened and each node came back.
    let mut problems = record.problems.clone();
    for victim in [Victim::Bystander, Victim::IngestNode] {
        match record.kills.iter().find(|k| k.victim == victim) {
            None => problems.push(format!("{} was never killed", victim.describe())),
            Some(k) if k.back_at.is_none() => {
                problems.push(format!(
                    "{} ({}) did not come back",
                    k.node,
                    victim.describe()
                ));
            }
            Some(_) => {}
        }
    }
    checks.push(Check::new(
        "two broker nodes killed (kill -9) and each started again",
        problems,
        record
            .kills
            .iter()
            .map(|k| {
                format!(
                    "{} ({}) back after {}",
                    k.node,
                    k.victim.describe(),
                    k.back_at.map_or("never".to_owned(), |b| format!(
                        "{:.1}s",
                        b.duration_since(k.killed_at).as_secs_f64()
                    ))
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    ));

    // Ingest finds another node while its own is down, and publishing recovers quickly.
    let mut problems = Vec::new();
    let mut detail = Vec::new();
    for (i, kill) in record.kills.iter().enumerate() {
        let next = record.kills.get(i + 1).map(|k| k.killed_at);
        let window = failure_window(failures, kill.killed_at, next);
        let line = format!(
            "after kill -9 of {} ({}): {} answers other than 200, the last {:.1}s after the kill",
            kill.node,
            kill.victim.describe(),
            window.answers,
            window.last_after.as_secs_f64()
        );
        figures.push(line.clone());
        detail.push(format!(
            "{}: {} non-200 within {:.1}s",
            kill.node,
            window.answers,
            window.last_after.as_secs_f64()
        ));
        let down = kill
            .back_at
            .map_or(FAILOVER_BOUND, |b| b.duration_since(kill.killed_at));
        let bound = FAILOVER_BOUND.min(down);
        if window.answers > 0 && window.last_after >= bound {
            problems.push(format!(
                "{line}: not before {:.1}s (the node was down {:.1}s)",
                bound.as_secs_f64(),
                down.as_secs_f64()
            ));
        }
        if kill.victim == Victim::IngestNode {
            match kill.ingest_moved_at {
                Some(at) => figures.push(format!(
                    "ingest 1 connected to another node {:.1}s after its node died",
                    at.duration_since(kill.killed_at).as_secs_f64()
                )),
                None => problems.push(format!(
                    "ingest 1 did not connect to another node while {} was down",
                    kill.node
                )),
            }
        }
    }
    checks.push(Check::new(
        "ingest moves to a live node and publishes fail only briefly after a node dies",
        problems,
        detail.join("; "),
    ));
    (checks, figures)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::failure_window;

    #[test]
    fn the_window_counts_failures_between_kills() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let failures = [at(0), at(500), at(1500), at(9000), at(12_000)];
        let w = failure_window(&failures, at(400), Some(at(10_000)));
        assert_eq!(w.answers, 3);
        assert_eq!(w.last_after, Duration::from_millis(8600));
        let none = failure_window(&failures, at(12_500), None);
        assert_eq!(none.answers, 0);
        assert_eq!(none.last_after, Duration::ZERO);
    }
}
