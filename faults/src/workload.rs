//! The load: signed webhook deliveries of opt-ins and replies, with Meta's duplicates and
//! redeliveries mixed in, posted to ingest like Meta does (retry until `200`).
//!
//! The plan is fixed before the run starts (from the seed). Each delivery remembers which
//! opt-ins and replies it carries, so the books can hold the system to exactly what ingest
//! acknowledged with `200`, and nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use lc_meta::signature::sign_sha256;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// App secret the suite's ingest accepts.
pub const APP_SECRET: &str = "faults-app-secret";
/// Pages the schedulers are configured with in the classic mode.
pub const PAGES: [&str; 3] = ["1000000000000001", "1000000000000002", "1000000000000003"];
/// A page no scheduler knows: its opt-ins must end `failed` (`unknown_page`).
pub const UNKNOWN_PAGE: &str = "1000000000000099";
/// Meta's first-message window.
pub const WINDOW_MS: i64 = 86_400_000;

/// The pages of a run and how the opt-ins spread over them.
#[derive(Debug, Clone)]
pub struct PageMix {
    /// Every page the schedulers know (the pages file lists them all).
    pub pages: Vec<String>,
    /// `Some(share)`: the first page gets this share of the opt-ins and the others split the
    /// rest evenly (a skewed load); `None`: every page alike.
    pub big_share: Option<f64>,
}

impl PageMix {
    /// The classic mode's three pages, alike.
    pub fn classic() -> Self {
        Self {
            pages: PAGES.iter().map(|p| (*p).to_owned()).collect(),
            big_share: None,
        }
    }

    /// `n` pages (at least 2), the first one getting `share` of the opt-ins.
    pub fn skewed(n: usize, share: f64) -> Self {
        Self {
            pages: (1..=n.max(2))
                .map(|k| format!("2000000000000{k:03}"))
                .collect(),
            big_share: Some(share.clamp(0.0, 1.0)),
        }
    }

    /// The page carrying the big share, if the load is skewed.
    pub fn big(&self) -> Option<&str> {
        self.big_share
            .and_then(|_| self.pages.first())
            .map(String::as_str)
    }

    /// A page for one opt-in or reply. An even mix draws exactly as the classic suite always
    /// did, so a classic seed still makes the same load.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> String {
        match self.big_share {
            None => self.pages[rng.usize(..self.pages.len())].clone(),
            Some(share) => {
                if rng.f64() < share || self.pages.len() < 2 {
                    self.pages[0].clone()
                } else {
                    self.pages[rng.usize(1..self.pages.len())].clone()
                }
            }
        }
    }
}

/// Why an opt-in was generated the way it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptinKind {
    /// A fresh opt-in: should be sent.
    Fresh,
    /// Its last send time falls inside the run: sent or expired, never called late.
    NearDeadline,
    /// Arrives already past its window: expired at once.
    Stale,
    /// For a page the scheduler does not know: failed.
    UnknownPage,
}

/// One opt-in of the plan.
#[derive(Debug, Clone)]
pub struct OptinSpec {
    /// The page.
    pub page: String,
    /// The login_id.
    pub login_id: String,
    /// The opt-in's own time (Unix ms).
    pub ts_ms: i64,
    /// Its kind.
    pub kind: OptinKind,
}

/// One reply of the plan.
#[derive(Debug, Clone)]
pub struct ReplySpec {
    /// The page.
    pub page: String,
    /// `prior_message.identifier`, if the reply carries one.
    pub login_id: Option<String>,
    /// The sender's PSID.
    pub psid: String,
    /// The message id.
    pub mid: String,
    /// The reply's own time (Unix ms): a little after its opt-in's.
    pub ts_ms: i64,
}

/// What a delivery carries, for the books.
#[derive(Debug, Clone, Copy)]
pub enum ItemRef {
    /// Index into [`Plan::optins`].
    Optin(usize),
    /// Index into [`Plan::replies`].
    Reply(usize),
}

/// One POST body.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The exact bytes (a redelivery posts them again).
    pub body: Vec<u8>,
    /// What it carries.
    pub items: Vec<ItemRef>,
    /// True for a verbatim redelivery of an earlier body.
    pub redelivery: bool,
}

/// The whole load.
pub struct Plan {
    /// Every opt-in (duplicates refer to the same entry).
    pub optins: Vec<OptinSpec>,
    /// Every reply (redeliveries refer to the same entry).
    pub replies: Vec<ReplySpec>,
    /// The bodies, in posting order.
    pub deliveries: Vec<Delivery>,
}

fn item_json(
    plan_optins: &[OptinSpec],
    replies: &[ReplySpec],
    r: ItemRef,
    shift_ms: i64,
) -> (String, Value) {
    match r {
        ItemRef::Optin(i) => {
            let o = &plan_optins[i];
            (
                o.page.clone(),
                json!({"recipient": {"id": o.page}, "timestamp": o.ts_ms + shift_ms,
                       "optin": {"login_id": o.login_id}}),
            )
        }
        ItemRef::Reply(i) => {
            let r = &replies[i];
            let mut v = json!({"sender": {"id": r.psid}, "recipient": {"id": r.page},
                               "timestamp": r.ts_ms,
                               "message": {"mid": r.mid, "text": "Track my order",
                                           "quick_reply": {"payload": "TRACK"}}});
            if let Some(login_id) = &r.login_id {
                v["prior_message"] = json!({"source": "login_connect", "identifier": login_id});
            }
            (r.page.clone(), v)
        }
    }
}

fn body(entries: Vec<(String, Value)>, now_ms: i64) -> Vec<u8> {
    let mut by_page: Vec<(String, Vec<Value>)> = Vec::new();
    for (page, item) in entries {
        match by_page.iter_mut().find(|(p, _)| *p == page) {
            Some((_, items)) => items.push(item),
            None => by_page.push((page, vec![item])),
        }
    }
    let entry: Vec<Value> = by_page
        .into_iter()
        .map(|(page, items)| json!({"id": page, "time": now_ms, "messaging": items}))
        .collect();
    serde_json::to_vec(&json!({"object": "page", "entry": entry})).unwrap_or_default()
}

fn digits(rng: &mut fastrand::Rng, n: usize) -> String {
    (0..n).map(|_| rng.digit(10)).collect()
}

impl Plan {
    /// Builds the load: `optins` opt-ins and `replies` replies for the pages of `mix`, spread
    /// over `load` from `start_ms` (Unix ms), with `margin_ms` the schedulers' safety margin.
    pub fn build(
        rng: &mut fastrand::Rng,
        mix: &PageMix,
        optins: usize,
        replies: usize,
        start_ms: i64,
        load: Duration,
        margin_ms: i64,
    ) -> Self {
        let load_ms = i64::try_from(load.as_millis()).unwrap_or(i64::MAX);
        let mut specs = Vec::with_capacity(optins);
        for i in 0..optins {
            let roll = rng.u32(0..1000);
            let (kind, page) = match roll {
                0..=9 => (OptinKind::UnknownPage, UNKNOWN_PAGE.to_owned()),
                10..=19 => (OptinKind::Stale, mix.pick(rng)),
                20..=49 => (OptinKind::NearDeadline, mix.pick(rng)),
                _ => (OptinKind::Fresh, mix.pick(rng)),
            };
            // Where in the load this opt-in will be posted (roughly: its position).
            let at_ms = start_ms
                + load_ms * i64::try_from(i).unwrap_or(0)
                    / i64::try_from(optins.max(1)).unwrap_or(1);
            let ts_ms = match kind {
                OptinKind::Fresh | OptinKind::UnknownPage => at_ms - rng.i64(0..5_000),
                OptinKind::Stale => at_ms - 2 * WINDOW_MS,
                // The last send time (deadline - margin) lands 10 s before to 40 s after the
                // moment it is posted: some are sent, some expire, none may be called late.
                OptinKind::NearDeadline => at_ms - WINDOW_MS + margin_ms + rng.i64(-10_000..40_000),
            };
            specs.push(OptinSpec {
                page,
                login_id: format!("L{i:06}-{}", digits(rng, 10)),
                ts_ms,
                kind,
            });
        }
        let mut reply_specs = Vec::with_capacity(replies);
        let mut psids: HashMap<String, String> = HashMap::new();
        for j in 0..replies {
            let roll = rng.u32(0..100);
            let (page, login_id, base_ms) = if roll < 85 && !specs.is_empty() {
                let o = &specs[rng.usize(..specs.len())];
                (o.page.clone(), Some(o.login_id.clone()), o.ts_ms)
            } else if roll < 92 {
                // A reply naming a login_id whose opt-in never reaches us: still linked.
                let page = mix.pick(rng);
                (page, Some(format!("R{j:06}-{}", digits(rng, 8))), start_ms)
            } else {
                (mix.pick(rng), None, start_ms)
            };
            let psid = match &login_id {
                Some(l) => psids
                    .entry(l.clone())
                    .or_insert_with(|| digits(rng, 16))
                    .clone(),
                None => digits(rng, 16),
            };
            reply_specs.push(ReplySpec {
                page,
                login_id,
                psid,
                mid: format!("m_{}", uuid::Uuid::new_v4().simple()),
                ts_ms: base_ms + rng.i64(1_000..60_000),
            });
        }

        // The stream of items: every opt-in and reply once, 5% of opt-ins twice (Meta's
        // duplicate), 3% of replies twice, then shuffled so replies may come first.
        let mut stream: Vec<(ItemRef, i64)> = Vec::new();
        for i in 0..specs.len() {
            stream.push((ItemRef::Optin(i), 0));
            match rng.u32(0..100) {
                0..=4 => stream.push((ItemRef::Optin(i), 0)),
                // Same login_id a second later: a new webhook, same window (a duplicate).
                5..=6 => stream.push((ItemRef::Optin(i), 1000)),
                _ => {}
            }
        }
        for j in 0..reply_specs.len() {
            stream.push((ItemRef::Reply(j), 0));
            if rng.u32(0..100) < 3 {
                stream.push((ItemRef::Reply(j), 0));
            }
        }
        // Keep the opt-ins roughly in plan order (their timestamps assume it) but let them
        // swap with neighbours, and put each reply anywhere (before or after its opt-in).
        // The key is drawn once per item (`sort_by_cached_key`): a comparator that changed
        // its mind would break the sort.
        let span = i64::try_from(specs.len().max(1)).unwrap_or(1) * 4;
        stream.sort_by_cached_key(|(r, _)| match r {
            ItemRef::Optin(i) => i64::try_from(*i).unwrap_or(0) * 4 + rng.i64(0..200),
            ItemRef::Reply(_) => rng.i64(0..span),
        });

        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = rng.usize(1..=20).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let entries = chunk
                .iter()
                .map(|(r, shift)| item_json(&specs, &reply_specs, *r, *shift))
                .collect();
            deliveries.push(Delivery {
                body: body(entries, start_ms),
                items: chunk.iter().map(|(r, _)| *r).collect(),
                redelivery: false,
            });
        }
        // Meta redelivers whole bodies it did not see acknowledged: 3% again, later.
        let originals = deliveries.len();
        for k in 0..originals {
            if rng.u32(0..100) < 3 {
                let mut again = deliveries[k].clone();
                again.redelivery = true;
                let at = rng.usize(k..=deliveries.len());
                deliveries.insert(at, again);
            }
        }
        Self {
            optins: specs,
            replies: reply_specs,
            deliveries,
        }
    }
}

/// What posting the load produced.
#[derive(Debug, Default)]
pub struct PostResults {
    /// Per delivery: ingest answered 200 (eventually).
    pub acked: Vec<bool>,
    /// HTTP statuses seen (including those of retries), and `error` for no answer.
    pub statuses: HashMap<String, u64>,
    /// Extra posts made because an earlier try of the same body was not a 200.
    pub retries: u64,
    /// When each answer that was not a 200 came (the cluster mode measures how long
    /// publishes failed after a broker node died).
    pub failures: Vec<Instant>,
}

/// Posts every delivery over `load`, with up to `concurrency` in flight, each retried like
/// Meta (on another ingest, with backoff, for up to `give_up`) until it gets a 200.
pub async fn post_all(
    plan: Arc<Plan>,
    ingests: Vec<String>,
    load: Duration,
    concurrency: usize,
    give_up: Duration,
) -> PostResults {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap_or_default();
    let results = Arc::new(Mutex::new(PostResults {
        acked: vec![false; plan.deliveries.len()],
        ..PostResults::default()
    }));
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let n = plan.deliveries.len().max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..plan.deliveries.len() {
        let due = start + load.mul_f64(k as f64 / n as f64);
        tokio::time::sleep_until(due).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (plan, http, ingests, results) =
            (plan.clone(), http.clone(), ingests.clone(), results.clone());
        tasks.spawn(async move {
            let ok = post_one(
                &http,
                &ingests,
                k,
                &plan.deliveries[k].body,
                give_up,
                &results,
            )
            .await;
            let mut r = results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            r.acked[k] = ok;
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut guard = results
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::mem::take(&mut *guard)
}

async fn post_one(
    http: &reqwest::Client,
    ingests: &[String],
    k: usize,
    body: &[u8],
    give_up: Duration,
    results: &Mutex<PostResults>,
) -> bool {
    let signature = sign_sha256(APP_SECRET, body);
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    for attempt in 0usize.. {
        let url = format!("{}/webhook", ingests[(k + attempt) % ingests.len()]);
        let answer = http
            .post(url)
            .header("x-hub-signature-256", &signature)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let status = match &answer {
            Ok(r) => r.status().as_u16().to_string(),
            Err(_) => "error".to_owned(),
        };
        {
            let mut r = results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *r.statuses.entry(status.clone()).or_default() += 1;
            if status != "200" {
                r.failures.push(Instant::now());
            }
            if attempt > 0 {
                r.retries += 1;
            }
        }
        if status == "200" {
            return true;
        }
        if started.elapsed() >= give_up {
            return false;
        }
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64())).await;
        delay = (delay * 2).min(Duration::from_secs(3));
    }
    false
}
