//! The webhook subscription watchdog.
//!
//! Meta unsubscribes an app from a Page's webhooks after an hour of failed deliveries
//! (Meta's Webhooks documentation) and only says so by e-mail; every opt-in after that is lost
//! silently.
//! Every `WATCHDOG_INTERVAL_SECS` the watchdog reads `GET /{page_id}/subscribed_apps` for
//! each configured page and, when the page's app or one of the fields loginconnect needs
//! ([`REQUIRED_FIELDS`]) is missing, subscribes again with
//! `POST /{page_id}/subscribed_apps` — keeping the fields that were still subscribed — logs
//! an error and counts it (`scheduler_webhook_resubscriptions_total{page_id}`). Graph
//! failures are logged and counted (`scheduler_watchdog_errors_total`); the next round tries
//! again.
//!
//! The page's app ([`AppIds`]) is the one the page registry binds it to (a technology
//! provider's client app), else the deployment's own `META_APP_ID`. A page with neither is
//! skipped with a log line ([`PageCheck::NoApp`]); without any bound page and without
//! `META_APP_ID` there is nothing to check and rounds are skipped quietly.
//!
//! Each round's findings are recorded per page in `page_state.unsubscribed_since` and
//! announced on the events exchange ([`announce`]): `subscription.lost` once when a page's
//! subscription is found incomplete, `subscription.restored` when a later round finds it
//! complete again (normally the round after the re-subscription).
//!
//! One replica at a time: the active watchdog holds a PostgreSQL session advisory lock on a
//! connection taken from the pool and keeps it (and the lock) between rounds; the other
//! replicas try `pg_try_advisory_lock` each round and skip it when they do not get it. So
//! there is one check per interval however many replicas run, and when the active replica
//! dies its session ends, the lock is released and another replica takes over at its next
//! round. The cost is one pooled connection held by the active replica.

pub mod announce;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::graph::GraphClient;
use deadpool_postgres::{Object, Pool};
use futures_util::StreamExt;
use lc_meta::pages::{PageConfig, PagesConfig};
use lc_shared::shutdown::Shutdown;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::RwLock;

/// The webhook fields loginconnect needs: opt-ins, replies, and replies by button.
pub const REQUIRED_FIELDS: [&str; 3] = ["messages", "messaging_optins", "messaging_postbacks"];
/// Advisory-lock key of the watchdog ("lcwatchd").
pub const WATCHDOG_LOCK_KEY: i64 = 0x6c63_7761_7463_6864;
/// Pages checked at the same time.
const CONCURRENT_CHECKS: usize = 8;

/// Settings of the watchdog.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchdogArgs {
    /// Seconds between subscription checks of every page; 0 disables the watchdog.
    #[arg(
        long = "watchdog-interval-secs",
        env = "WATCHDOG_INTERVAL_SECS",
        default_value_t = 300
    )]
    pub watchdog_interval_secs: u64,

    /// Our Meta app id (the app that receives the webhooks): the app checked on pages the
    /// page registry binds to no app. Pages bound to an app are checked for theirs.
    #[arg(long = "meta-app-id", env = "META_APP_ID")]
    pub meta_app_id: Option<String>,
}

impl Default for WatchdogArgs {
    /// The defaults of the flags: every 300 s, no `META_APP_ID` (only bound pages checked).
    fn default() -> Self {
        Self {
            watchdog_interval_secs: 300,
            meta_app_id: None,
        }
    }
}

impl WatchdogArgs {
    /// `META_APP_ID` (if set) and the interval, when the watchdog should run (interval > 0).
    pub fn enabled(&self) -> Option<(Option<String>, Duration)> {
        if self.watchdog_interval_secs == 0 {
            return None;
        }
        let app_id = self
            .meta_app_id
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned);
        Some((app_id, Duration::from_secs(self.watchdog_interval_secs)))
    }
}

/// Which app each page's subscription is checked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppIds {
    /// `META_APP_ID`: the app of pages bound to none.
    pub default: Option<String>,
    /// Page → the app the registry binds it to.
    pub by_page: HashMap<String, String>,
}

impl AppIds {
    /// The app of `page_id`: its binding, else [`Self::default`].
    pub fn of(&self, page_id: &str) -> Option<&str> {
        self.by_page
            .get(page_id)
            .or(self.default.as_ref())
            .map(String::as_str)
    }

    /// Whether any page can have an app (else a round has nothing to check).
    pub fn any(&self) -> bool {
        self.default.is_some() || !self.by_page.is_empty()
    }

    /// The bindings of the registry, with `default`.
    pub async fn load(pool: &Pool, default: Option<String>) -> Result<Self, String> {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let bindings = lc_shared::registry::bindings(&client)
            .await
            .map_err(|e| lc_shared::db::describe(&e))?;
        Ok(Self {
            default,
            by_page: bindings.page_app,
        })
    }
}

/// The watchdog's metrics, registered in the scheduler's registry.
#[derive(Clone)]
pub struct WatchdogMetrics {
    /// Re-subscriptions by page.
    pub resubscriptions: IntCounterVec,
    /// Failed Graph calls or database errors of the watchdog.
    pub errors: IntCounter,
    /// Rounds run by this replica.
    pub rounds: IntCounter,
    /// 1 while this replica is the active watchdog.
    pub active: IntGauge,
}

impl WatchdogMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            resubscriptions: IntCounterVec::new(
                Opts::new(
                    "scheduler_webhook_resubscriptions_total",
                    "Pages whose webhook subscription was missing our app or a field and was \
                     subscribed again",
                ),
                &["page_id"],
            )?,
            errors: IntCounter::new(
                "scheduler_watchdog_errors_total",
                "Subscription checks that failed (Graph or database errors)",
            )?,
            rounds: IntCounter::new(
                "scheduler_watchdog_rounds_total",
                "Subscription check rounds run by this replica",
            )?,
            active: IntGauge::new(
                "scheduler_watchdog_active",
                "Whether this replica holds the watchdog lock (1) or not (0)",
            )?,
        };
        registry.register(Box::new(m.resubscriptions.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.rounds.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        Ok(m)
    }
}

/// What one round found for one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageCheck {
    /// Our app receives every required field.
    Healthy,
    /// Something was missing and the page was subscribed again.
    Resubscribed {
        /// What was missing: `app` (our app was not subscribed at all) or field names.
        missing: Vec<String>,
        /// The fields subscribed now.
        fields: Vec<String>,
    },
    /// Something was missing and subscribing again failed (it is still missing).
    Missing {
        /// What was missing: `app` or field names.
        missing: Vec<String>,
        /// Graph's message (never contains a token).
        error: String,
    },
    /// Reading the subscriptions failed; the message is Graph's (never contains a token).
    Failed(String),
    /// Not checked: the page is bound to no app and `META_APP_ID` is not set.
    NoApp,
}

/// The result of [`check_once`], one entry per page in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// `(page_id, what happened)`.
    pub pages: Vec<(String, PageCheck)>,
}

/// One round for one app (`META_APP_ID`, no bindings): see [`check_round`].
pub async fn check_once(
    graph: &GraphClient,
    pages: &PagesConfig,
    app_id: &str,
    metrics: &WatchdogMetrics,
) -> RoundReport {
    let apps = AppIds {
        default: Some(app_id.to_owned()),
        by_page: HashMap::new(),
    };
    check_round(graph, pages, &apps, metrics).await
}

/// One round: checks every page of `pages` (a few at a time) for its app in `apps` and
/// repairs what is missing. Takes no lock; [`run`] calls it only on the active replica.
pub async fn check_round(
    graph: &GraphClient,
    pages: &PagesConfig,
    apps: &AppIds,
    metrics: &WatchdogMetrics,
) -> RoundReport {
    metrics.rounds.inc();
    for page in &pages.pages {
        // A zero series per page, so alerts on increase() see the first re-subscription.
        metrics
            .resubscriptions
            .with_label_values(&[page.id.as_str()]);
    }
    // Futures built up front (not in a `map` closure over references), which keeps the
    // round's future `Send` for `tokio::spawn`.
    let checks: Vec<_> = pages
        .pages
        .iter()
        .map(|page| check_page(graph, page, apps.of(&page.id), metrics))
        .collect();
    let checks = futures_util::stream::iter(checks)
        .buffered(CONCURRENT_CHECKS)
        .collect()
        .await;
    RoundReport { pages: checks }
}

async fn check_page(
    graph: &GraphClient,
    page: &PageConfig,
    app_id: Option<&str>,
    metrics: &WatchdogMetrics,
) -> (String, PageCheck) {
    let Some(app_id) = app_id else {
        tracing::warn!(page_id = %page.id, "watchdog: page skipped: it is bound to no app in the page registry and META_APP_ID is not set, so there is no app whose subscription to check (bind the page to its app, or set META_APP_ID)");
        return (page.id.clone(), PageCheck::NoApp);
    };
    (
        page.id.clone(),
        check_page_inner(graph, page, app_id, metrics).await,
    )
}

async fn check_page_inner(
    graph: &GraphClient,
    page: &PageConfig,
    app_id: &str,
    metrics: &WatchdogMetrics,
) -> PageCheck {
    let apps = match graph.subscribed_apps(page).await {
        Ok(apps) => apps,
        Err(e) => {
            metrics.errors.inc();
            tracing::error!(page_id = %page.id, error = %e, "watchdog: cannot read the page's webhook subscriptions");
            return PageCheck::Failed(e.to_string());
        }
    };
    let ours = apps.iter().find(|a| a.id == app_id);
    let existing: Vec<String> = ours
        .map(|a| a.subscribed_fields.clone())
        .unwrap_or_default();
    let missing_fields: Vec<String> = REQUIRED_FIELDS
        .iter()
        .filter(|f| !existing.iter().any(|e| e == *f))
        .map(|f| (*f).to_owned())
        .collect();
    if ours.is_some() && missing_fields.is_empty() {
        tracing::debug!(page_id = %page.id, "watchdog: webhook subscription complete");
        return PageCheck::Healthy;
    }
    // Keep what is still subscribed (e.g. message_deliveries) and add what is missing.
    let mut fields = existing;
    fields.extend(missing_fields.iter().cloned());
    let missing = if ours.is_none() {
        vec!["app".to_owned()]
    } else {
        missing_fields
    };
    let field_refs: Vec<&str> = fields.iter().map(String::as_str).collect();
    match graph.subscribe_app(page, &field_refs).await {
        Ok(()) => {
            metrics
                .resubscriptions
                .with_label_values(&[page.id.as_str()])
                .inc();
            tracing::error!(
                page_id = %page.id,
                app_id,
                missing = ?missing,
                fields = ?fields,
                "watchdog: the page's webhook subscription was incomplete (Meta unsubscribes \
                 after an hour of failed deliveries); subscribed again"
            );
            PageCheck::Resubscribed { missing, fields }
        }
        Err(e) => {
            metrics.errors.inc();
            tracing::error!(
                page_id = %page.id,
                missing = ?missing,
                error = %e,
                "watchdog: the page's webhook subscription is incomplete and subscribing again failed"
            );
            PageCheck::Missing {
                missing,
                error: e.to_string(),
            }
        }
    }
}

/// The watchdog lock, held on its own pooled connection.
pub struct Leadership {
    client: Object,
}

impl Leadership {
    /// Takes a connection and tries the lock; `Ok(None)` when another session holds it.
    pub async fn try_acquire(pool: &Pool) -> Result<Option<Self>, String> {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&WATCHDOG_LOCK_KEY])
            .await
            .map_err(|e| e.to_string())?;
        if row.get::<_, bool>(0) {
            Ok(Some(Self { client }))
        } else {
            // Nothing is held on this session: it goes back to the pool as it came.
            Ok(None)
        }
    }

    /// True while the session holding the lock is alive (its end releases the lock).
    pub async fn still_held(&self) -> bool {
        self.client.simple_query("SELECT 1").await.is_ok()
    }

    /// Releases the lock and closes the session, so the connection never returns to the pool
    /// with a lock on it.
    pub async fn release(self) {
        let _ = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&WATCHDOG_LOCK_KEY])
            .await;
        drop(Object::take(self.client));
    }
}

/// Runs the watchdog until `shutdown` (returns at once when not enabled).
pub async fn run(
    pool: Pool,
    graph: GraphClient,
    pages: Arc<RwLock<Arc<PagesConfig>>>,
    args: WatchdogArgs,
    metrics: WatchdogMetrics,
    shutdown: Shutdown,
) {
    let Some((app_id, interval)) = args.enabled() else {
        tracing::info!("webhook subscription watchdog off (WATCHDOG_INTERVAL_SECS is 0)");
        return;
    };
    tracing::info!(
        app_id = app_id.as_deref().unwrap_or("(none: bound pages only)"),
        interval_secs = interval.as_secs(),
        "webhook subscription watchdog on (each page checked for its registry app, else META_APP_ID)"
    );
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader: Option<Leadership> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => break,
        }
        let apps = match AppIds::load(&pool, app_id.clone()).await {
            Ok(apps) => apps,
            Err(e) => {
                metrics.errors.inc();
                tracing::warn!(error = %e, "watchdog: cannot read the pages' apps from the registry; skipping this round");
                continue;
            }
        };
        if !apps.any() {
            tracing::debug!(
                "watchdog: no page bound to an app and no META_APP_ID; nothing to check"
            );
            continue;
        }
        leader = match leader.take() {
            Some(held) if held.still_held().await => Some(held),
            Some(lost) => {
                tracing::warn!("watchdog: lost the lock's database session; trying again");
                drop(Object::take(lost.client));
                try_lead(&pool, &metrics).await
            }
            None => try_lead(&pool, &metrics).await,
        };
        metrics.active.set(i64::from(leader.is_some()));
        if leader.is_none() {
            tracing::debug!("watchdog: another replica is active; skipping this round");
            continue;
        }
        let pages = pages.read().await.clone();
        let report = tokio::select! {
            r = check_round(&graph, &pages, &apps, &metrics) => r,
            () = shutdown.wait() => break,
        };
        if let Err(e) = announce::record_round(&pool, &report).await {
            metrics.errors.inc();
            tracing::warn!(error = %e, "watchdog: cannot record the round's findings; the next round tries again");
        }
        let repaired = report
            .pages
            .iter()
            .filter(|(_, c)| matches!(c, PageCheck::Resubscribed { .. }))
            .count();
        tracing::debug!(pages = report.pages.len(), repaired, "watchdog round done");
    }
    if let Some(held) = leader {
        held.release().await;
    }
    metrics.active.set(0);
}

async fn try_lead(pool: &Pool, metrics: &WatchdogMetrics) -> Option<Leadership> {
    match Leadership::try_acquire(pool).await {
        Ok(Some(l)) => {
            tracing::info!("watchdog: this replica is now the active subscription watchdog");
            Some(l)
        }
        Ok(None) => None,
        Err(e) => {
            metrics.errors.inc();
            tracing::warn!(error = %e, "watchdog: cannot try the lock; skipping this round");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_only_with_an_app_id_and_an_interval() {
        let five_minutes = Duration::from_secs(300);
        assert_eq!(
            WatchdogArgs::default().enabled(),
            Some((None, five_minutes))
        );
        let on = WatchdogArgs {
            watchdog_interval_secs: 300,
            meta_app_id: Some(" 123 ".into()),
        };
        assert_eq!(on.enabled(), Some((Some("123".into()), five_minutes)));
        let zero = WatchdogArgs {
            watchdog_interval_secs: 0,
            ..on.clone()
        };
        assert_eq!(zero.enabled(), None);
        let blank = WatchdogArgs {
            meta_app_id: Some(String::new()),
            ..on
        };
        assert_eq!(blank.enabled(), Some((None, five_minutes)));
    }
}
