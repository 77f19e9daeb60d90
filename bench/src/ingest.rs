//! The `ingest` suite: signed webhook bodies posted over HTTP at increasing concurrency, and
//! its ceiling, a bare lapin publisher sending the same messages to the same exchange with the
//! same confirm discipline (publish a body's messages, await their confirms, many bodies in
//! flight on the same number of confirm channels), and a second such ceiling on another AMQP
//! client (amqprs, [`crate::amqprs_publisher`]) to tell lapin's costs from the broker's.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation};
use lc_shared::outgoing::{Outgoing, event_message};
use lc_shared::telemetry::TraceParent;

use crate::amqprs_publisher::{self, AmqprsPublisher};
use crate::bodies::{SignedBody, reply_bodies};
use crate::env::BenchEnv;
use crate::hist::round3;
use crate::load::{LoadResult, OpResult, closed_loop, open_loop};
use crate::proc_stats::{broker_pid, cpu_over_window};
use crate::report::Report;

/// Sizes and durations of the ingest suite.
#[derive(Debug, Clone)]
pub struct IngestParams {
    /// Concurrency levels (requests in flight) of the closed-loop runs.
    pub levels: Vec<usize>,
    /// Events per body: 1 (one ~1 KB event) and a batch (50).
    pub shapes: Vec<usize>,
    /// Warm-up before each measurement window.
    pub warmup: Duration,
    /// Measurement window of each level.
    pub measure: Duration,
    /// Length of the open-loop run at half the peak rate.
    pub open: Duration,
    /// Distinct pre-signed bodies per shape.
    pub bodies: usize,
}

impl IngestParams {
    /// `--quick`: about 40 s.
    pub fn quick() -> Self {
        Self {
            levels: vec![8, 32, 64],
            shapes: vec![1, 50],
            warmup: Duration::from_millis(500),
            measure: Duration::from_millis(1500),
            open: Duration::from_secs(3),
            bodies: 64,
        }
    }

    /// The full run: about 3 minutes.
    pub fn full() -> Self {
        Self {
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(8),
            open: Duration::from_secs(15),
            ..Self::quick()
        }
    }
}

/// Runs the suite.
pub async fn run(params: &IngestParams, quick: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("ingest", quick).await;
    crate::machine::reset_peak_rss();
    let env = BenchEnv::new(16).await?;
    let config = env.ingest_config()?;
    let channels = config.publish_channels;
    let ingest = env.start_ingest(config).await?;
    let url = format!("http://{}/webhook", ingest.service.addr);
    let broker = env.broker().await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .context("HTTP client")?;
    report.note(format!(
        "ingest with production defaults ({channels} confirm channels, 2 s confirm bound); bodies are pre-signed \
         reply events of ~1 KB; queues are purged between levels; ceiling = bare lapin publisher, \
         {channels} confirm channels, same messages and properties, mandatory, one body's confirms awaited together; \
         second ceiling = the same through a bare amqprs publisher (tokio-native client)"
    ));

    let mut peak_single = 0.0;
    let mut ratios = Vec::new();
    for &shape in &params.shapes {
        let bodies = Arc::new(reply_bodies(&env.pages, params.bodies, shape));
        let mut best_ingest: f64 = 0.0;
        for &c in &params.levels {
            let r = closed_loop(
                c,
                params.warmup,
                params.measure,
                post_op(&client, &url, &bodies),
            )
            .await;
            best_ingest = best_ingest.max(r.events_per_s());
            add_run(
                &mut report,
                &format!("ingest_{shape}ev_c{c}"),
                &r,
                "POST /webhook",
            );
            env.purge_work_queues(&broker).await?;
        }
        let messages = Arc::new(messages_of(&bodies)?);
        let chans = confirm_channels(&broker, channels).await?;
        let mut best_broker: f64 = 0.0;
        for &c in &params.levels {
            let cpu = cpu_over_window(params.warmup, params.measure, broker_pid());
            let r = closed_loop(
                c,
                params.warmup,
                params.measure,
                publish_op(&chans, &messages),
            )
            .await;
            best_broker = best_broker.max(r.events_per_s());
            add_run(
                &mut report,
                &format!("broker_{shape}ev_c{c}"),
                &r,
                "bare publish + confirms",
            );
            add_cpu(&mut report, &format!("broker_{shape}ev_c{c}"), &r, cpu).await;
            env.purge_work_queues(&broker).await?;
        }
        for ch in chans.iter() {
            let _ = ch.close(200, "done".into()).await;
        }
        let best_amqprs = amqprs_ceiling(
            &mut report,
            params,
            &env,
            &broker,
            &messages,
            shape,
            channels,
        )
        .await?;
        // The same client and bodies against an endpoint that only answers 200: what HTTP
        // alone costs on this machine (the load generator shares the cores).
        let http_floor = {
            let floor = crate::null_graph::NullGraph::start().await?;
            let c = params.levels.iter().copied().max().unwrap_or(64);
            let r = closed_loop(
                c,
                params.warmup,
                params.measure,
                post_op(&client, &floor.webhook_url(), &bodies),
            )
            .await;
            add_run(
                &mut report,
                &format!("http_only_{shape}ev_c{c}"),
                &r,
                "POST to a 200-only endpoint",
            );
            r.events_per_s()
        };
        let ratio = if best_broker > 0.0 {
            best_ingest / best_broker
        } else {
            0.0
        };
        report.add(
            format!("ingest_{shape}ev_peak_events_per_s"),
            best_ingest.round(),
            "events/s",
            "best level",
        );
        report.add(
            format!("ingest_{shape}ev_broker_ceiling_events_per_s"),
            best_broker.round(),
            "events/s",
            "bare publisher, best level",
        );
        report.add(
            format!("ingest_{shape}ev_amqprs_ceiling_events_per_s"),
            best_amqprs.round(),
            "events/s",
            "bare amqprs publisher, best level",
        );
        report.add(
            format!("ingest_lapin_vs_amqprs_bare_{shape}ev"),
            round3(if best_amqprs > 0.0 {
                best_broker / best_amqprs
            } else {
                0.0
            }),
            "ratio",
            "lapin bare / amqprs bare (best levels)",
        );
        report.add(
            format!("ingest_{shape}ev_vs_broker"),
            round3(ratio),
            "ratio",
            "ingest / ceiling",
        );
        // Ingest does both jobs on the same two cores: HTTP (with the load generator's side)
        // and the publish. If their CPU costs simply add, the most it can do is the harmonic
        // sum of the two ceilings; the bare publisher alone is no ceiling for a process that
        // also serves HTTP on the same cores.
        if http_floor > 0.0 && best_broker > 0.0 {
            let serial = 1.0 / (1.0 / http_floor + 1.0 / best_broker);
            report.add(
                format!("ingest_{shape}ev_http_plus_broker_ceiling_events_per_s"),
                serial.round(),
                "events/s",
                "1 / (1/HTTP floor + 1/bare publisher): both costs on the same cores",
            );
            report.add(
                format!("ingest_{shape}ev_vs_http_plus_broker"),
                round3(best_ingest / serial),
                "ratio",
                "ingest / (HTTP floor ⊕ bare publisher)",
            );
        }
        ratios.push(ratio);
        if shape == 1 {
            peak_single = best_ingest;
        }
    }
    let headline = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    if headline.is_finite() {
        report.add(
            "ingest_vs_broker",
            round3(headline),
            "ratio",
            "headline: the lower of the shapes' ratios",
        );
    }

    if peak_single > 0.0 {
        // Let the broker finish the background work of the last purge before measuring latency.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let bodies = Arc::new(reply_bodies(&env.pages, params.bodies, 1));
        let rate = peak_single / 2.0;
        let op = post_op(&client, &url, &bodies);
        let warm = params.open.min(Duration::from_secs(1));
        let r = open_loop(rate, params.open, warm, 4096, move |i| op(0, i)).await;
        report.add(
            "ingest_half_peak_rate_per_s",
            rate.round(),
            "events/s",
            "open loop arrival rate (1-event bodies)",
        );
        add_run(
            &mut report,
            "ingest_half_peak",
            &r,
            "open loop, from scheduled start",
        );
        report.add(
            "ingest_half_peak_shed",
            r.shed as f64,
            "count",
            "arrivals shed (> 4096 outstanding)",
        );
    }
    env.purge_work_queues(&broker).await?;
    let _ = broker.close(200, "done".into()).await;
    crate::env::stop(&ingest.shutdown, ingest.service.task).await;
    report.finish();
    report.target(
        "ingest ≥ 0.8 × bare publisher ceiling",
        "ingest_vs_broker",
        0.8,
        false,
    );
    report.target(
        "ingest p99 < 25 ms at half of peak rate",
        "ingest_half_peak_p99_ms",
        25.0,
        true,
    );
    report.target(
        "ingest RSS < 64 MB (in-process: includes load generator)",
        "ingest_peak_rss_mb",
        64.0,
        true,
    );
    Ok(report)
}

/// The second ceiling (#18: is lapin the wall?): the same messages, levels and confirm
/// discipline through a bare amqprs publisher on the same vhost; returns its best rate.
async fn amqprs_ceiling(
    report: &mut Report,
    params: &IngestParams,
    env: &BenchEnv,
    broker: &lapin::Connection,
    messages: &[Arc<Vec<Outgoing>>],
    shape: usize,
    channels: usize,
) -> anyhow::Result<f64> {
    let converted = messages
        .iter()
        .map(|m| amqprs_publisher::convert(m).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let converted = Arc::new(converted);
    let publisher = AmqprsPublisher::connect(&env.vhost.url(), channels).await?;
    let mut best: f64 = 0.0;
    for &c in &params.levels {
        let cpu = cpu_over_window(params.warmup, params.measure, broker_pid());
        let r = closed_loop(
            c,
            params.warmup,
            params.measure,
            publisher.publish_op(&converted),
        )
        .await;
        best = best.max(r.events_per_s());
        let prefix = format!("broker_amqprs_{shape}ev_c{c}");
        add_run(report, &prefix, &r, "bare amqprs publish + confirms");
        add_cpu(report, &prefix, &r, cpu).await;
        env.purge_work_queues(broker).await?;
    }
    let returned = publisher.returned();
    if returned > 0 {
        report.add(
            format!("broker_amqprs_{shape}ev_returned"),
            returned as f64,
            "count",
            "mandatory messages returned unroutable (0 is right)",
        );
    }
    publisher.close().await;
    Ok(best)
}

/// CPU time per event of a bare publisher's window: the bench process (the publisher and its
/// load loop; ingest idles meanwhile) and the RabbitMQ node, when it can be found.
async fn add_cpu(
    report: &mut Report,
    prefix: &str,
    r: &LoadResult,
    cpu: tokio::task::JoinHandle<Option<(f64, Option<f64>)>>,
) {
    let Ok(Some((client_s, broker_s))) = cpu.await else {
        return;
    };
    if r.events == 0 {
        return;
    }
    let per_event = |s: f64| round3(s * 1e6 / r.events as f64);
    report.add(
        format!("{prefix}_client_cpu_us_per_event"),
        per_event(client_s),
        "µs",
        "bench process CPU (utime+stime) over the window / events",
    );
    if let Some(b) = broker_s {
        report.add(
            format!("{prefix}_broker_cpu_us_per_event"),
            per_event(b),
            "µs",
            "RabbitMQ node CPU over the window / events",
        );
    }
}

/// Adds a run's rate, failures and latency figures under `prefix`.
pub fn add_run(report: &mut Report, prefix: &str, r: &LoadResult, what: &str) {
    report.add(
        format!("{prefix}_events_per_s"),
        r.events_per_s().round(),
        "events/s",
        format!("{what}: accepted events"),
    );
    report.add(
        format!("{prefix}_req_per_s"),
        r.ops_per_s().round(),
        "req/s",
        format!("{what}: successful requests"),
    );
    if r.failed > 0 {
        report.add(
            format!("{prefix}_failed"),
            r.failed as f64,
            "count",
            format!("{what}: failures"),
        );
        if let Some(e) = &r.first_error {
            report.note(format!("{prefix}: first failure: {e}"));
        }
    }
    r.latency.report(report, prefix, &format!("{what} latency"));
}

/// One signed POST per call, cycling through `bodies`.
fn post_op(
    client: &reqwest::Client,
    url: &str,
    bodies: &Arc<Vec<SignedBody>>,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = OpResult> + Send>>
+ Send
+ Sync
+ 'static {
    let (client, url, bodies) = (client.clone(), url.to_owned(), bodies.clone());
    move |worker, i| {
        let b = &bodies[(worker * 7 + i as usize) % bodies.len()];
        let events = b.events;
        let req = client
            .post(&url)
            .header(lc_meta::signature::SIGNATURE_256_HEADER, &b.signature)
            .header("content-type", "application/json")
            .body(b.body.clone());
        Box::pin(async move {
            match req.send().await {
                Ok(resp) if resp.status() == reqwest::StatusCode::OK => {
                    let _ = resp.bytes().await;
                    Ok(events)
                }
                Ok(resp) => Err(format!("HTTP {}", resp.status())),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// The messages ingest would publish for each body (parsed and built by ingest's own code).
fn messages_of(bodies: &[SignedBody]) -> anyhow::Result<Vec<Arc<Vec<Outgoing>>>> {
    bodies
        .iter()
        .map(|b| {
            let trace = TraceParent::new_root().to_string();
            let events = lc_meta::webhook::parse_delivery(&b.body)?;
            let msgs = events
                .iter()
                .map(|ev| event_message(ev, &trace))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Arc::new(msgs))
        })
        .collect()
}

async fn confirm_channels(conn: &lapin::Connection, n: usize) -> anyhow::Result<Arc<Vec<Channel>>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        out.push(ch);
    }
    Ok(Arc::new(out))
}

/// One body's messages per call: publish all, then await all confirms.
fn publish_op(
    channels: &Arc<Vec<Channel>>,
    messages: &Arc<Vec<Arc<Vec<Outgoing>>>>,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = OpResult> + Send>>
+ Send
+ Sync
+ 'static {
    let (channels, messages) = (channels.clone(), messages.clone());
    move |worker, i| {
        let n = worker * 7 + i as usize;
        let msgs = messages[n % messages.len()].clone();
        let ch = channels[n % channels.len()].clone();
        Box::pin(async move {
            let mut confirms = Vec::with_capacity(msgs.len());
            for m in msgs.iter() {
                let confirm = ch
                    .basic_publish(
                        m.exchange.into(),
                        m.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &m.body,
                        m.properties.clone(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                match confirm.await {
                    Ok(Confirmation::Ack(None)) => {}
                    Ok(other) => return Err(format!("not confirmed: {other:?}")),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(msgs.len() as u64)
        })
    }
}
