//! A mixed open-loop load through ingest's webhook: opt-ins, replies to opt-ins that were
//! sent, and redeliveries (a recent body posted again, byte for byte), in a fixed cycle, at a
//! fixed arrival rate. Results stream into a window the caller takes at any time (the soak
//! takes one per minute) and into the run's totals.
//!
//! Latency of a POST is counted from its scheduled start (no coordinated omission); an
//! arrival finding `max_outstanding` requests still open is shed and counted. Each opt-in is
//! registered with the [`TimedGraph`] before it is posted, so its send is timed end to end.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::bodies::{SignedBody, delivery, optin_item, reply_item, sign, unix_ms};
use crate::hist::Latency;
use crate::timed_graph::TimedGraph;

/// Bodies kept for redelivery.
const RECENT_KEPT: usize = 64;

/// What one arrival posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Login Connect opt-in (one send expected).
    OptIn,
    /// A reply naming a sent opt-in's `login_id` (one link expected).
    Reply,
    /// A recent body again (nothing new expected).
    Redelivery,
}

impl Kind {
    /// Every kind, in index order.
    pub const ALL: [Kind; 3] = [Self::OptIn, Self::Reply, Self::Redelivery];

    /// Its name in figures.
    pub fn name(self) -> &'static str {
        match self {
            Self::OptIn => "optin",
            Self::Reply => "reply",
            Self::Redelivery => "redelivery",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::OptIn => 0,
            Self::Reply => 1,
            Self::Redelivery => 2,
        }
    }
}

/// The cycle of arrivals: `optins` opt-ins, then `replies` replies, then `redeliveries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Opt-ins per cycle (at least 1).
    pub optins: u32,
    /// Replies per cycle.
    pub replies: u32,
    /// Redeliveries per cycle.
    pub redeliveries: u32,
}

impl Mix {
    /// Arrivals per opt-in: the total arrival rate is the opt-in rate times this.
    pub fn arrivals_per_optin(&self) -> f64 {
        f64::from(self.cycle()) / f64::from(self.optins.max(1))
    }

    /// The kind of arrival `i`.
    pub fn kind(&self, i: u64) -> Kind {
        let at = (i % u64::from(self.cycle())) as u32;
        if at < self.optins.max(1) {
            Kind::OptIn
        } else if at < self.optins.max(1) + self.replies {
            Kind::Reply
        } else {
            Kind::Redelivery
        }
    }

    fn cycle(&self) -> u32 {
        self.optins.max(1) + self.replies + self.redeliveries
    }
}

/// POST outcomes per kind over a window (or a whole run).
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Latency of every POST completed, per kind (index order of [`Kind::ALL`]).
    pub latency: [Latency; 3],
    /// Bodies answered 200, per kind (one event each).
    pub ok: [u64; 3],
    /// Bodies that failed, per kind.
    pub failed: [u64; 3],
    /// Arrivals not posted because too many were outstanding.
    pub shed: u64,
    /// The first failure seen.
    pub first_error: Option<String>,
}

impl Window {
    /// Accepted bodies of `kind`.
    pub fn ok(&self, kind: Kind) -> u64 {
        self.ok[kind.index()]
    }

    /// Failed bodies of `kind`.
    pub fn failed(&self, kind: Kind) -> u64 {
        self.failed[kind.index()]
    }

    /// POST latency of `kind`.
    pub fn latency(&self, kind: Kind) -> &Latency {
        &self.latency[kind.index()]
    }

    /// Every POST's latency, whatever its kind.
    pub fn all_latency(&self) -> Latency {
        let mut all = Latency::new();
        for l in &self.latency {
            all.merge(l);
        }
        all
    }

    fn record(&mut self, kind: Kind, d: Duration, outcome: &Result<(), String>) {
        self.latency[kind.index()].record(d);
        match outcome {
            Ok(()) => self.ok[kind.index()] += 1,
            Err(e) => {
                self.failed[kind.index()] += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(e.clone());
                }
            }
        }
    }
}

/// The load generator of one run.
pub struct MixedLoad {
    client: reqwest::Client,
    url: String,
    graph: Arc<TimedGraph>,
    pages: Vec<String>,
    /// Distinguishes the `login_id`s of separate phases of a run.
    prefix: String,
    window: Mutex<Window>,
    totals: Mutex<Window>,
    recent: Mutex<VecDeque<SignedBody>>,
}

impl MixedLoad {
    /// A generator posting to `url`, spreading opt-ins over `pages`; `prefix` starts every
    /// `login_id` it makes.
    pub fn new(
        url: String,
        graph: Arc<TimedGraph>,
        pages: Vec<String>,
        prefix: &str,
    ) -> anyhow::Result<Arc<Self>> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()?;
        Ok(Arc::new(Self {
            client,
            url,
            graph,
            pages,
            prefix: prefix.to_owned(),
            window: Mutex::new(Window::default()),
            totals: Mutex::new(Window::default()),
            recent: Mutex::new(VecDeque::new()),
        }))
    }

    /// Posts at `optin_rate` opt-ins per second (plus the replies and redeliveries of `mix`)
    /// for `duration`, then waits for the requests still open.
    pub async fn run(self: &Arc<Self>, optin_rate: f64, duration: Duration, mix: Mix) {
        let rate = (optin_rate * mix.arrivals_per_optin()).max(0.001);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let max_outstanding = 4096;
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for i in 0..total {
            let scheduled = start + interval.mul_f64(i as f64);
            tokio::time::sleep_until(scheduled).await;
            while tasks.try_join_next().is_some() {}
            if tasks.len() >= max_outstanding {
                lock(&self.window).shed += 1;
                lock(&self.totals).shed += 1;
                continue;
            }
            let kind = mix.kind(i);
            let Some((body, optin)) = self.body(kind, i, scheduled) else {
                continue;
            };
            let me = self.clone();
            tasks.spawn(async move { me.post(kind, body, optin, scheduled).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// The outcomes since the last call (and starts a new window).
    pub fn take_window(&self) -> Window {
        std::mem::take(&mut *lock(&self.window))
    }

    /// The outcomes of the whole run so far.
    pub fn totals(&self) -> Window {
        lock(&self.totals).clone()
    }

    /// The body of arrival `i`, and the opt-in's `login_id` when it is one. `None` for a
    /// redelivery before anything was posted.
    fn body(&self, kind: Kind, i: u64, scheduled: Instant) -> Option<(SignedBody, Option<String>)> {
        let now = unix_ms(time::OffsetDateTime::now_utc());
        let fresh = |signed: SignedBody| {
            let mut recent = lock(&self.recent);
            if recent.len() >= RECENT_KEPT {
                recent.pop_front();
            }
            recent.push_back(signed.clone());
            signed
        };
        match kind {
            Kind::OptIn => {
                let page = &self.pages[i as usize % self.pages.len().max(1)];
                let login_id = format!("{}o{i}", self.prefix);
                let signed = sign(
                    delivery(page, vec![optin_item(page, &login_id, now)], now),
                    1,
                );
                self.graph.expect(login_id.clone(), scheduled);
                Some((fresh(signed), Some(login_id)))
            }
            Kind::Reply => {
                // A reply to a pending opt-in would cancel its send; name a sent one (or,
                // before the first send, a login_id that never opted in).
                let (page, login_id) = self.graph.recently_sent().unwrap_or_else(|| {
                    (
                        self.pages[i as usize % self.pages.len().max(1)].clone(),
                        format!("{}x{i}", self.prefix),
                    )
                });
                let psid = format!("{}", 7_100_000_000_000_000u64 + i);
                let mid = format!("m_{}{i:012}AbCdEfGhIjKlMnOpQrStUvWxYz", self.prefix);
                let item = reply_item(&page, &psid, &mid, &login_id, now);
                Some((fresh(sign(delivery(&page, vec![item], now), 1)), None))
            }
            Kind::Redelivery => {
                let recent = lock(&self.recent);
                let pick = fastrand::usize(..recent.len().max(1));
                recent.get(pick).cloned().map(|b| (b, None))
            }
        }
    }

    async fn post(&self, kind: Kind, body: SignedBody, optin: Option<String>, scheduled: Instant) {
        let outcome = match self
            .client
            .post(&self.url)
            .header(lc_meta::signature::SIGNATURE_256_HEADER, &body.signature)
            .header("content-type", "application/json")
            .body(body.body)
            .send()
            .await
        {
            Ok(r) if r.status() == reqwest::StatusCode::OK => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(e) => Err(e.to_string()),
        };
        let d = Instant::now().saturating_duration_since(scheduled);
        if outcome.is_err()
            && let Some(login_id) = &optin
        {
            self.graph.forget(login_id);
        }
        lock(&self.window).record(kind, d, &outcome);
        lock(&self.totals).record(kind, d, &outcome);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_cycles_in_order() {
        let mix = Mix {
            optins: 2,
            replies: 1,
            redeliveries: 1,
        };
        let kinds: Vec<Kind> = (0..8).map(|i| mix.kind(i)).collect();
        assert_eq!(
            kinds,
            [
                Kind::OptIn,
                Kind::OptIn,
                Kind::Reply,
                Kind::Redelivery,
                Kind::OptIn,
                Kind::OptIn,
                Kind::Reply,
                Kind::Redelivery
            ]
        );
        assert!((mix.arrivals_per_optin() - 2.0).abs() < 1e-9);
    }
}
