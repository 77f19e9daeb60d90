//! One sample of the soak: table sizes, the outbox's unpublished rows, queue depths (a
//! passive `queue_declare` each, so no management API is needed), each service process's
//! resident memory and CPU time, and the latencies of the interval since the last sample.

use std::fmt::Write as _;

use lc_shared::topology;

use crate::child::{Service, Services};
use crate::env::BenchEnv;
use crate::hist::Latency;
use crate::mixed::{MixedLoad, Window};
use crate::proc_stats::ProcStats;
use crate::timed_graph::TimedGraph;

/// What one sample saw.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Minutes since the load started.
    pub t_min: f64,
    /// Rows in `optins`.
    pub optins: i64,
    /// Rows in `links`.
    pub links: i64,
    /// Rows in `outbox`.
    pub outbox: i64,
    /// Rows in `outbox` not yet published.
    pub unpublished: i64,
    /// Messages ready in `scheduler.optins`.
    pub scheduler_queue: u32,
    /// Messages ready in `correlator.replies`.
    pub correlator_queue: u32,
    /// Messages in both work queues' dead-letter queues.
    pub dead_lettered: u32,
    /// Each service's memory and CPU, in [`Service::ALL`] order.
    pub procs: Vec<(Service, ProcStats)>,
    /// Send API calls so far.
    pub sends: u64,
    /// Opt-in webhook → Graph latencies of the interval.
    pub e2e: Latency,
    /// POST outcomes of the interval.
    pub posts: Window,
}

impl Sample {
    /// The figures of `service`.
    pub fn proc(&self, service: Service) -> ProcStats {
        self.procs
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, st)| *st)
            .unwrap_or_default()
    }

    /// One line of the samples table.
    pub fn line(&self) -> String {
        let mut out = format!(
            "{:>6.2} min  optins={} links={} outbox={} unpublished={} q_sched={} q_corr={} dlq={} sends={}",
            self.t_min,
            self.optins,
            self.links,
            self.outbox,
            self.unpublished,
            self.scheduler_queue,
            self.correlator_queue,
            self.dead_lettered,
            self.sends
        );
        for (s, st) in &self.procs {
            let _ = write!(
                out,
                " {}_rss_mb={:.1} {}_cpu_s={:.1}",
                s.name(),
                st.rss_kb as f64 / 1024.0,
                s.name(),
                st.cpu_s
            );
        }
        if self.e2e.count() > 0 {
            let _ = write!(out, " e2e_p99_ms={:.1}", self.e2e.quantile_ms(0.99));
        }
        let posts = self.posts.all_latency();
        if posts.count() > 0 {
            let _ = write!(out, " post_p99_ms={:.1}", posts.quantile_ms(0.99));
        }
        out
    }
}

/// Takes samples: a database connection and a broker channel of the soak's environment.
pub struct Sampler {
    sql: tokio_postgres::Client,
    channel: lapin::Channel,
    _conn: lapin::Connection,
}

impl Sampler {
    /// Connects to `env`'s database and vhost.
    pub async fn new(env: &BenchEnv) -> anyhow::Result<Self> {
        let sql = env.sql().await?;
        let conn = env.broker().await?;
        let channel = conn.create_channel().await?;
        Ok(Self {
            sql,
            channel,
            _conn: conn,
        })
    }

    /// Samples now, `t_min` minutes into the load; takes the interval's latencies from the
    /// Graph stand-in and the load.
    pub async fn take(
        &self,
        t_min: f64,
        services: &Services,
        graph: &TimedGraph,
        load: &MixedLoad,
    ) -> anyhow::Result<Sample> {
        let row = self
            .sql
            .query_one(
                "SELECT (SELECT count(*) FROM optins), (SELECT count(*) FROM links), \
                 (SELECT count(*) FROM outbox), \
                 (SELECT count(*) FROM outbox WHERE published_at IS NULL)",
                &[],
            )
            .await?;
        let depth =
            |q: String| async move { lc_testkit::harness::queue_depth(&self.channel, &q).await };
        let mut dead_lettered = 0;
        for (queue, _) in topology::WORK_QUEUES {
            dead_lettered += depth(topology::dead_letter_queue(queue)).await;
        }
        Ok(Sample {
            t_min,
            optins: row.get(0),
            links: row.get(1),
            outbox: row.get(2),
            unpublished: row.get(3),
            scheduler_queue: depth(topology::SCHEDULER_QUEUE.to_owned()).await,
            correlator_queue: depth(topology::CORRELATOR_QUEUE.to_owned()).await,
            dead_lettered,
            procs: services.stats()?,
            sends: graph.calls(),
            e2e: graph.take_window(),
            posts: load.take_window(),
        })
    }
}
