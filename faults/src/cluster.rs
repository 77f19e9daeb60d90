//! The cluster mode (`--cluster`, issue 15): the suite's broker is three private RabbitMQ
//! nodes joined into one cluster (see `lc_testkit::private::PrivateBroker::start_cluster`),
//! every process gets all three in `AMQP_URL`, and under load two nodes die by `kill -9` of
//! their Erlang VM (`beam.smp`): first a node no ingest is connected to, later the node
//! ingest 1 is connected to. Each is started again after a pause and must rejoin.
//!
//! The quorum queues are declared by the topology without `x-quorum-initial-group-size`:
//! RabbitMQ then places each on `min(quorum_cluster_size, nodes)` nodes (3 by default), so
//! on a three-node cluster every member is on its own node; the books check it from
//! `rabbitmqctl list_queues name members` before the first kill. The books also say how long
//! ingest answered anything but 200 after each kill, and whether ingest moved to another node.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lc_testkit::private::PrivateBroker;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::chaos::Timeline;
use crate::setup::Services;

/// Broker nodes of the cluster mode.
pub const NODES: usize = 3;

/// Why a node was chosen to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    /// A node no ingest was connected to (its queue members still had to fail over).
    Bystander,
    /// The node ingest 1 was connected to.
    IngestNode,
}

impl Victim {
    /// Words for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Bystander => "a node no ingest is connected to",
            Self::IngestNode => "the node ingest 1 is connected to",
        }
    }
}

/// One node kill as it happened.
#[derive(Debug, Clone)]
pub struct NodeKill {
    /// Why this node.
    pub victim: Victim,
    /// The Erlang node name.
    pub node: String,
    /// When the `kill -9` was sent.
    pub killed_at: Instant,
    /// When the node answered again after its restart (`None`: it did not).
    pub back_at: Option<Instant>,
    /// For [`Victim::IngestNode`]: when ingest 1 logged its connection to another node.
    pub ingest_moved_at: Option<Instant>,
}

/// What the cluster mode saw, for the books.
#[derive(Debug, Default)]
pub struct ClusterRecord {
    /// Every node of the cluster (Erlang names).
    pub nodes: Vec<String>,
    /// Each quorum queue of the vhost with the nodes its members are on, before the kills.
    pub members: Vec<(String, Vec<String>)>,
    /// The kills, in order.
    pub kills: Vec<NodeKill>,
    /// Problems met while injecting (a kill or a restart that failed).
    pub problems: Vec<String>,
}

/// What the node faults need.
pub struct NodeFaults<'a> {
    /// The suite's services (the cluster).
    pub services: &'a Services,
    /// Where the processes' logs are (`ingest-1.log`).
    pub log_dir: PathBuf,
    /// The record of faults.
    pub timeline: &'a mut Timeline,
    /// How long the load runs.
    pub load: Duration,
    /// How long a killed node stays down.
    pub down_for: Duration,
}

impl NodeFaults<'_> {
    /// Runs both kills at fixed points of the load (25 % and 60 %) and returns what
    /// happened; problems are recorded, not returned, so the books still run.
    pub async fn run(mut self) -> ClusterRecord {
        let started = Instant::now();
        let services = self.services;
        let nodes = services.broker_nodes();
        let mut record = ClusterRecord {
            nodes: nodes.iter().map(|n| n.node.clone()).collect(),
            ..ClusterRecord::default()
        };
        match quorum_members(self.services) {
            Ok(members) => record.members = members,
            Err(e) => record
                .problems
                .push(format!("cannot list the quorum queues' members: {e:#}")),
        }
        for (at, victim) in [(0.25, Victim::Bystander), (0.6, Victim::IngestNode)] {
            let due = started + self.load.mul_f64(at);
            tokio::time::sleep_until(due.into()).await;
            if let Err(e) = await_members_online(self.services, Duration::from_secs(60)).await {
                record.problems.push(format!(
                    "before killing {}: not every queue member is back: {e:#}",
                    victim.describe()
                ));
            }
            match self.kill_and_restart(&nodes, victim).await {
                Ok(kill) => record.kills.push(kill),
                Err(e) => {
                    self.timeline.note(format!(
                        "cluster: killing {} failed: {e:#}",
                        victim.describe()
                    ));
                    record
                        .problems
                        .push(format!("killing {} failed: {e:#}", victim.describe()));
                }
            }
        }
        record
    }

    async fn kill_and_restart(
        &mut self,
        nodes: &[&PrivateBroker],
        victim: Victim,
    ) -> anyhow::Result<NodeKill> {
        let log = self.log_dir.join("ingest-1.log");
        let ingest_node = connected_node(&log, nodes)?;
        let target = match victim {
            Victim::IngestNode => {
                ingest_node.context("ingest 1 logged no connection to any node of the cluster")?
            }
            // The last node ingest 1 is not on (ingest 2 starts with the same first node).
            Victim::Bystander => (0..nodes.len())
                .rev()
                .find(|k| Some(*k) != ingest_node)
                .context("no node to kill")?,
        };
        let node = nodes[target];
        let connections_before = connection_lines(&log)?;
        let (pid, killed_at) = node.kill9().await?;
        self.timeline.note(format!(
            "cluster: kill -9 of {} (beam.smp pid {pid}, port {}): {}",
            node.node,
            node.port,
            victim.describe()
        ));
        let mut ingest_moved_at = None;
        let back_due = killed_at + self.down_for;
        if victim == Victim::IngestNode {
            // Ingest must find another node while this one is down. When it did is read from
            // its log line's own timestamp (this loop only notices it later).
            let killed_wall = OffsetDateTime::now_utc() - killed_at.elapsed();
            while Instant::now() < back_due {
                if let Some((logged, now_on)) = new_connection(&log, connections_before, nodes)? {
                    if now_on.is_none_or(|k| k == target) {
                        // Not another node of the cluster: no failover.
                        self.timeline.note(format!(
                            "cluster: ingest 1 connected to {} while its node was down",
                            now_on.map_or("an unknown node", |k| nodes[k].node.as_str())
                        ));
                        break;
                    }
                    let after = (logged - killed_wall).max(time::Duration::ZERO);
                    let after = Duration::try_from(after).unwrap_or_default();
                    ingest_moved_at = Some(killed_at + after);
                    self.timeline.note(format!(
                        "cluster: ingest 1 connected to {} {:.2}s after the kill (its log)",
                        now_on.map_or("an unknown node", |k| nodes[k].node.as_str()),
                        after.as_secs_f64()
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep_until(back_due.into()).await;
        let back_at = match node.start_again().await {
            Ok(()) => {
                self.timeline.note(format!(
                    "cluster: {} started again and answering (down {:.1}s)",
                    node.node,
                    killed_at.elapsed().as_secs_f64()
                ));
                Some(Instant::now())
            }
            Err(e) => {
                self.timeline
                    .note(format!("cluster: {} did not come back: {e:#}", node.node));
                None
            }
        };
        Ok(NodeKill {
            victim,
            node: node.node.clone(),
            killed_at,
            back_at,
            ingest_moved_at,
        })
    }
}

/// The `connected to RabbitMQ` lines of a log so far (each is a new connection).
fn connection_lines(log: &Path) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    Ok(text
        .lines()
        .filter(|l| l.contains("connected to RabbitMQ; topology declared"))
        .count())
}

/// The first `connected to RabbitMQ` line after the first `seen` ones: its timestamp (the
/// line's first word, RFC 3339) and the node it names.
fn new_connection(
    log: &Path,
    seen: usize,
    nodes: &[&PrivateBroker],
) -> anyhow::Result<Option<(OffsetDateTime, Option<usize>)>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let Some(line) = text
        .lines()
        .filter(|l| l.contains("connected to RabbitMQ; topology declared"))
        .nth(seen)
    else {
        return Ok(None);
    };
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let stamp = strip_ansi(line.split_whitespace().next().unwrap_or_default());
    let logged = OffsetDateTime::parse(&stamp, &Rfc3339)
        .with_context(|| format!("no timestamp at the start of {line:?}"))?;
    Ok(Some((logged, node_of_line(line, &ports))))
}

/// `s` without ANSI colour sequences (the text log format colours its fields).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Which of `nodes` the process logging to `log` connected to last (its `node` field names
/// the node's URL, whose port tells the node).
fn connected_node(log: &Path, nodes: &[&PrivateBroker]) -> anyhow::Result<Option<usize>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let Some(line) = text
        .lines()
        .rev()
        .find(|l| l.contains("connected to RabbitMQ; topology declared"))
    else {
        return Ok(None);
    };
    Ok(node_of_line(
        line,
        &nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
    ))
}

/// The index of the port of `ports` a log line's node URL names (`…127.0.0.1:<port>/…`).
fn node_of_line(line: &str, ports: &[u16]) -> Option<usize> {
    ports
        .iter()
        .position(|p| line.contains(&format!("127.0.0.1:{p}/")))
}

/// `rabbitmqctl list_queues name type members` of the vhost: each quorum queue with the
/// nodes of its members.
pub fn quorum_members(services: &Services) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let out = services.ctl(&[
        "-q",
        "list_queues",
        "-p",
        &services.vhost,
        "name",
        "type",
        "members",
        "--no-table-headers",
    ])?;
    Ok(parse_members(&out))
}

/// Parses `name\ttype\t[node, node, …]` lines; keeps the quorum queues.
fn parse_members(out: &str) -> Vec<(String, Vec<String>)> {
    out.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            let (name, kind, members) = (parts.next()?, parts.next()?, parts.next()?);
            (kind.trim() == "quorum").then(|| {
                let nodes = members
                    .split(|c: char| c == ',' || c == '[' || c == ']' || c.is_whitespace())
                    .filter(|t| t.contains('@'))
                    .map(|t| t.trim_matches(['\'', '"']).to_owned())
                    .collect();
                (name.trim().to_owned(), nodes)
            })
        })
        .collect()
}

/// Waits until every quorum queue of the vhost has all its members online (a restarted
/// node's members have rejoined), so the next kill never takes a queue's majority.
async fn await_members_online(services: &Services, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = services.ctl(&[
            "-q",
            "list_queues",
            "-p",
            &services.vhost,
            "name",
            "type",
            "online",
            "--no-table-headers",
        ]);
        let short: Vec<String> = match &out {
            Ok(out) => parse_members(out)
                .into_iter()
                .filter(|(_, online)| online.len() < NODES)
                .map(|(q, online)| format!("{q} ({} online)", online.len()))
                .collect(),
            Err(e) => vec![format!("{e:#}")],
        };
        if short.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("after {timeout:?}: {}", short.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{node_of_line, parse_members, strip_ansi};

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026-11-30T21:39:16.080308Z\u{1b}[0m"),
            "2026-11-30T21:39:16.080308Z"
        );
    }

    #[test]
    fn members_are_read_per_quorum_queue() {
        let out = "scheduler.optins\tquorum\t[a-1@localhost, a-2@localhost, a-3@localhost]\n\
                   faults.classic\tclassic\t\n\
                   messenger.other\tquorum\t[a-1@localhost]\n";
        assert_eq!(
            parse_members(out),
            vec![
                (
                    "scheduler.optins".to_owned(),
                    vec![
                        "a-1@localhost".to_owned(),
                        "a-2@localhost".to_owned(),
                        "a-3@localhost".to_owned()
                    ]
                ),
                (
                    "messenger.other".to_owned(),
                    vec!["a-1@localhost".to_owned()]
                ),
            ]
        );
    }

    #[test]
    fn the_node_is_told_by_its_port() {
        let line = "INFO connected to RabbitMQ; topology declared connection=ingest \
                    node=amqp://guest:***@127.0.0.1:40002/faults_1";
        assert_eq!(node_of_line(line, &[40001, 40002, 40003]), Some(1));
        assert_eq!(node_of_line(line, &[4000, 400]), None);
    }
}
