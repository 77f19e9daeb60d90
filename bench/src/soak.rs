//! The `soak` suite: the three services as their own processes ([`crate::child`]) under a
//! sustained mixed load — opt-ins, replies to sent opt-ins and redeliveries of recent bodies
//! ([`crate::mixed`]) — for `--minutes` (30 by default, 3 in `all --quick`), sampled at
//! regular intervals ([`crate::soak_sample`]), with a verdict per series at the end: flat,
//! growing or falling, with the least-squares slope per minute and its 95 % interval
//! ([`crate::trend`]).
//!
//! The rate is `--rate` opt-ins/s when given, else half the capacity a probe measures first
//! ([`crate::soak_probe`]: an open-loop ramp of the soak's own mix, keeping the highest rate
//! whose backlogs stayed under half a second of arrivals). Samples are
//! taken every minute (runs under ten minutes: ten samples, so a short run still has a fit);
//! the fit leaves out the first fifth of the run (at least one interval) as warm-up.
//!
//! The scheduler prunes finished opt-ins after `OPTIN_RETENTION_SECS=10` (a hidden setting
//! for benchmarks), so the `optins` table must plateau; links and published outbox rows are
//! kept by design (one link per person; outbox rows for `OUTBOX_RETENTION_HOURS`) and are
//! expected to grow at the reply rate.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::child::{Binaries, Service, Services};
use crate::env::BenchEnv;
use crate::hist::{Latency, round3};
use crate::mixed::{Kind, Mix, MixedLoad};
use crate::report::Report;
use crate::soak_probe::{self, RampParams};
use crate::soak_sample::{Sample, Sampler};
use crate::timed_graph::TimedGraph;
use crate::trend::{self, Verdict};

/// Relative change over the fit below which a significant slope still counts as flat.
pub const RELATIVE_THRESHOLD: f64 = 0.05;

/// Settings of the soak.
#[derive(Debug, Clone)]
pub struct SoakParams {
    /// Length of the load.
    pub minutes: f64,
    /// Opt-ins per second; `None`: half the probed capacity.
    pub rate: Option<f64>,
    /// Latency of the Graph stand-in.
    pub graph_latency: Duration,
    /// Pages the opt-ins are spread over.
    pub pages: usize,
    /// Opt-ins, replies and redeliveries per cycle.
    pub mix: Mix,
    /// The capacity probe's ramp.
    pub probe: RampParams,
    /// `OPTIN_RETENTION_SECS` of the scheduler.
    pub retention_secs: u64,
}

impl SoakParams {
    /// The 30-minute soak.
    pub fn full() -> Self {
        Self {
            minutes: 30.0,
            rate: None,
            graph_latency: Duration::from_millis(100),
            pages: 16,
            mix: Mix {
                optins: 6,
                replies: 3,
                redeliveries: 1,
            },
            probe: RampParams {
                start_rate: 100.0,
                growth: 1.25,
                step: Duration::from_secs(20),
                max_steps: 16,
            },
            retention_secs: 10,
        }
    }

    /// The 3-minute variant of `all --quick`.
    pub fn quick() -> Self {
        Self {
            minutes: 3.0,
            probe: RampParams {
                step: Duration::from_secs(8),
                ..Self::full().probe
            },
            ..Self::full()
        }
    }

    /// Time between samples: a minute, or a tenth of runs shorter than ten minutes.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64((self.minutes * 60.0 / 10.0).clamp(1.0, 60.0))
    }
}

/// Whether a series should stay level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Must not grow: growth here is a leak or a falling-behind.
    Flat,
    /// Grows by design at the load's rate (why, for the verdict line).
    Accumulates(&'static str),
}

/// Reads a series' value from a sample and the one before it.
type Reader = Box<dyn Fn(&Sample, &Sample) -> f64>;

/// One series: its name, unit, expectation, near-zero floor and how to read it from a sample
/// (with the one before it, for rates).
struct SeriesDef {
    name: String,
    unit: &'static str,
    expect: Expect,
    floor: f64,
    value: Reader,
}

fn def(
    name: &str,
    unit: &'static str,
    expect: Expect,
    floor: f64,
    value: impl Fn(&Sample, &Sample) -> f64 + 'static,
) -> SeriesDef {
    SeriesDef {
        name: name.to_owned(),
        unit,
        expect,
        floor,
        value: Box::new(value),
    }
}

/// Seconds between two samples.
fn secs_between(s: &Sample, prev: &Sample) -> f64 {
    ((s.t_min - prev.t_min) * 60.0).max(1e-9)
}

fn series() -> Vec<SeriesDef> {
    let mut all = vec![
        def("optins_rows", "rows", Expect::Flat, 1000.0, |s, _| {
            s.optins as f64
        }),
        def(
            "links_rows",
            "rows",
            Expect::Accumulates("one link per person, kept"),
            1000.0,
            |s, _| s.links as f64,
        ),
        def(
            "outbox_rows",
            "rows",
            Expect::Accumulates("published rows are kept OUTBOX_RETENTION_HOURS"),
            1000.0,
            |s, _| s.outbox as f64,
        ),
        def("outbox_unpublished", "rows", Expect::Flat, 100.0, |s, _| {
            s.unpublished as f64
        }),
        def(
            "scheduler_queue",
            "messages",
            Expect::Flat,
            100.0,
            |s, _| f64::from(s.scheduler_queue),
        ),
        def(
            "correlator_queue",
            "messages",
            Expect::Flat,
            100.0,
            |s, _| f64::from(s.correlator_queue),
        ),
        def("dead_lettered", "messages", Expect::Flat, 10.0, |s, _| {
            f64::from(s.dead_lettered)
        }),
        def("sends_per_s", "sends/s", Expect::Flat, 1.0, |s, prev| {
            s.sends.saturating_sub(prev.sends) as f64 / secs_between(s, prev)
        }),
        def("e2e_p99_ms", "ms", Expect::Flat, 10.0, |s, _| p99(&s.e2e)),
        def("post_p99_ms", "ms", Expect::Flat, 10.0, |s, _| {
            p99(&s.posts.all_latency())
        }),
    ];
    for service in Service::ALL {
        all.push(def(
            &format!("{}_rss_mb", service.name()),
            "MB",
            Expect::Flat,
            1.0,
            move |s, _| s.proc(service).rss_kb as f64 / 1024.0,
        ));
        all.push(def(
            &format!("{}_cpu_pct", service.name()),
            "% of a core",
            Expect::Flat,
            1.0,
            move |s, prev| {
                100.0 * (s.proc(service).cpu_s - prev.proc(service).cpu_s) / secs_between(s, prev)
            },
        ));
    }
    all
}

fn p99(l: &Latency) -> f64 {
    if l.count() == 0 {
        f64::NAN
    } else {
        l.quantile_ms(0.99)
    }
}

/// Runs the soak.
pub async fn run(params: &SoakParams, quick: bool) -> anyhow::Result<Report> {
    let mut report = Report::new("soak", quick).await;
    report.out_of_process(format!(
        "soak: ingest, scheduler and correlator are the service binaries, each its own process \
         (production defaults, OPTIN_RETENTION_SECS={}); this process runs the load generator, \
         the Graph stand-in ({} ms) and the sampler, on a {}-core machine shared with other work",
        params.retention_secs,
        params.graph_latency.as_millis(),
        crate::machine::cores()
    ));
    let bins = Binaries::locate().await?;
    report.note(format!(
        "{}: service binaries from {}",
        report.suite,
        bins.origin()
    ));
    let env = BenchEnv::new(params.pages).await?;
    let _pool = env.migrated_pool(1).await?;
    let graph = Arc::new(TimedGraph::start(params.graph_latency).await?);
    let retention = [("OPTIN_RETENTION_SECS", params.retention_secs.to_string())];
    let services = Services::start(&env, &bins, &graph.base_url(), &retention).await?;
    let sampler = Sampler::new(&env).await?;

    let rate = match params.rate {
        Some(r) => r,
        None => {
            let ramp = soak_probe::ramp(
                &services,
                &graph,
                &sampler,
                &env.pages,
                params.mix,
                params.probe,
            )
            .await?;
            report_probe(&mut report, params, &ramp);
            anyhow::ensure!(
                ramp.capacity >= 1.0,
                "the capacity probe's first step ({:.0} opt-ins/s) did not keep up; give the \
                 rate with --rate",
                params.probe.start_rate
            );
            ramp.capacity / 2.0
        }
    };
    report.add(
        "soak_rate_optins_per_s",
        round3(rate),
        "optins/s",
        format!(
            "opt-in rate ({}); per cycle {} opt-ins, {} replies, {} redeliveries",
            if params.rate.is_some() {
                "given"
            } else {
                "half the probed capacity"
            },
            params.mix.optins,
            params.mix.replies,
            params.mix.redeliveries
        ),
    );
    report.add("soak_minutes", params.minutes, "min", "length of the load");

    let load = MixedLoad::new(
        services.webhook_url.clone(),
        graph.clone(),
        env.pages.clone(),
        "s",
    )?;
    // The probe's latencies are not the soak's.
    let _ = graph.take_window();
    let started = Instant::now();
    let mut samples = vec![sampler.take(0.0, &services, &graph, &load).await?];
    eprintln!(
        "soak at {rate:.1} opt-ins/s for {} min\n{}",
        params.minutes,
        samples[0].line()
    );
    let duration = Duration::from_secs_f64(params.minutes * 60.0);
    let driver = {
        let load = load.clone();
        let mix = params.mix;
        tokio::spawn(async move { load.run(rate, duration, mix).await })
    };
    let interval = params.interval();
    let intervals = (duration.as_secs_f64() / interval.as_secs_f64())
        .round()
        .max(1.0) as u32;
    let sampled = async {
        for k in 1..=intervals {
            tokio::time::sleep_until(started + interval * k).await;
            let t_min = started.elapsed().as_secs_f64() / 60.0;
            let s = sampler.take(t_min, &services, &graph, &load).await?;
            eprintln!("{}", s.line());
            samples.push(s);
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = sampled {
        // A failed sample (a service died, the database went away) ends the run; the load
        // must not go on posting in the background.
        driver.abort();
        return Err(e);
    }
    driver.await?;
    let peaks = services.stats()?;
    drop(services);

    let warmup_min = (params.minutes * 0.2).max(interval.as_secs_f64() / 60.0);
    let unexpected_growth = verdicts(&mut report, &samples, warmup_min);
    report.add(
        "soak_flat_series_growing",
        unexpected_growth as f64,
        "count",
        "series expected flat that were growing (0 is right)",
    );
    summarise(&mut report, &samples, &load, &graph);
    for (service, st) in &peaks {
        report.add(
            format!("soak_{}_peak_rss_mb", service.name()),
            round3(st.hwm_kb as f64 / 1024.0),
            "MB",
            format!(
                "{}: peak resident set over the soak (VmHWM)",
                service.name()
            ),
        );
    }
    report.attach(
        "soak_samples",
        samples
            .iter()
            .map(Sample::line)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    report.finish();
    report.target(
        "series expected flat stay flat over the soak",
        "soak_flat_series_growing",
        0.0,
        true,
    );
    Ok(report)
}

/// Fits every series over the samples after `warmup_min`, adds its slope figures and verdict
/// line, and returns how many series expected flat were growing.
fn verdicts(report: &mut Report, samples: &[Sample], warmup_min: f64) -> usize {
    let mut unexpected = 0;
    report.note(format!(
        "verdicts: least squares over the samples after {warmup_min:.2} min; growing or falling \
         when the slope's 95 % CI excludes 0 and the change over the fit exceeds {} % of the \
         series' mean (or of its near-zero floor)",
        RELATIVE_THRESHOLD * 100.0
    ));
    for def in series() {
        let points: Vec<(f64, f64)> = samples
            .windows(2)
            .filter(|w| w[1].t_min >= warmup_min)
            .map(|w| (w[1].t_min, (def.value)(&w[1], &w[0])))
            .filter(|(_, y)| y.is_finite())
            .collect();
        let t = trend::fit(&points, RELATIVE_THRESHOLD, def.floor);
        let expected = match def.expect {
            Expect::Flat => "expected flat".to_owned(),
            Expect::Accumulates(why) => format!("expected to grow: {why}"),
        };
        if def.expect == Expect::Flat && t.verdict == Verdict::Growing {
            unexpected += 1;
        }
        report.note(format!(
            "verdict {} ({}; {expected}) — {t}",
            def.name, def.unit
        ));
        if t.verdict != Verdict::TooFewSamples {
            report.add(
                format!("soak_{}_slope_per_min", def.name),
                t.slope,
                def.unit,
                format!("{}: least-squares slope per minute", def.name),
            );
            report.add(
                format!("soak_{}_ci95_per_min", def.name),
                t.ci95,
                def.unit,
                format!("{}: half-width of the slope's 95 % interval", def.name),
            );
        }
    }
    unexpected
}

/// The run's totals: POSTs per kind, sends, end-to-end and POST latencies.
fn summarise(report: &mut Report, samples: &[Sample], load: &MixedLoad, graph: &TimedGraph) {
    let totals = load.totals();
    for kind in Kind::ALL {
        report.add(
            format!("soak_{}_posts", kind.name()),
            totals.ok(kind) as f64,
            "count",
            format!("{} bodies ingest accepted", kind.name()),
        );
    }
    let failed: u64 = Kind::ALL.iter().map(|k| totals.failed(*k)).sum();
    report.add(
        "soak_post_failed",
        failed as f64,
        "count",
        "POSTs that failed",
    );
    report.add(
        "soak_post_shed",
        totals.shed as f64,
        "count",
        "arrivals shed (4,096 open)",
    );
    if let Some(e) = &totals.first_error {
        report.note(format!("soak: first failed POST: {e}"));
    }
    report.add(
        "soak_unexpected_sends",
        graph.unexpected() as f64,
        "count",
        "Send API calls for a login_id neither expected nor of a failed POST: a second send or a stray one (0 is right)",
    );
    report.add(
        "soak_sends_after_failed_posts",
        graph.sends_after_failed_posts() as f64,
        "count",
        "first sends for opt-ins whose POST failed after the message was queued (at least once; not a second send)",
    );
    report.add(
        "soak_unsent_at_end",
        graph.outstanding() as f64,
        "count",
        "opt-ins accepted but not sent when the load stopped (the last seconds' are in flight)",
    );
    let mut e2e = Latency::new();
    for s in samples {
        e2e.merge(&s.e2e);
    }
    e2e.report(
        report,
        "soak_e2e",
        "opt-in webhook POST → Send API call, whole soak",
    );
    totals.all_latency().report(
        report,
        "soak_post",
        "POST /webhook of every kind, whole soak",
    );
}

/// Adds the probe's capacity, its ramp and how it decided.
fn report_probe(report: &mut Report, params: &SoakParams, ramp: &soak_probe::Ramp) {
    let p = params.probe;
    report.add(
        "soak_capacity_optins_per_s",
        ramp.capacity.round(),
        "optins/s",
        format!(
            "probe: open-loop ramp of the soak's mix from {:.0} opt-ins/s, x{} every {} s; the \
             highest rate whose unsent opt-ins and queued deliveries each stayed under {} s of \
             arrivals, e2e p99 under {} ms, nothing refused{}",
            p.start_rate,
            p.growth,
            p.step.as_secs(),
            soak_probe::BACKLOG_SECS,
            soak_probe::P99_LIMIT_MS,
            if ramp.ceiling_reached {
                " (every step kept up: a lower bound)"
            } else {
                ""
            }
        ),
    );
    report.note(format!(
        "probe ramp:\n{}",
        ramp.steps
            .iter()
            .map(|s| format!("  {}", s.line()))
            .collect::<Vec<_>>()
            .join("\n")
    ));
}
