//! The Login half of ingest: the endpoints Facebook Login needs besides Meta's webhook, all
//! off unless configured ([`LoginArgs`]).
//!
//! Rooms:
//! - `args`: the settings ([`LoginArgs`]) and their validation.
//! - `metrics`: the counters both endpoints share ([`LoginMetrics`]).
//! - `answer`: the JSON error answers both endpoints give.
//! - `login_events`: `POST /login-events`, opt-ins reported by the business's own backend
//!   ([`parse_login_event`], [`queued_optin`]).
//! - `data_deletion`: `POST /data-deletion`, Meta's user data deletion callback, and
//!   `GET /data-deletion/{code}`, its status page ([`derive_identities`]).
//!
//! Each endpoint carries its own router state, `None` when not configured so its routes
//! answer `404`; [`routes`] builds them and merges them into one router.

mod answer;
mod args;
mod data_deletion;
mod login_events;
mod metrics;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use lc_meta::secret::Secret;
use lc_shared::amqp::BrokerLink;
use prometheus::Registry;

use crate::error::IngestError;
use data_deletion::DataDeletion;
use login_events::LoginEvents;

pub use args::LoginArgs;
pub use data_deletion::derive_identities;
pub use login_events::{LoginEvent, LoginEventError, parse_login_event, queued_optin};
pub use metrics::LoginMetrics;

/// Largest body of the Login half's endpoints: their requests are a few hundred bytes.
const MAX_LOGIN_BODY_BYTES: usize = 64 * 1024;

/// The Login half's routes, for merging into ingest's router (any state type: these carry
/// their own). Validates `args`; `app_secrets` verify Meta's `signed_request`. The counters
/// are registered only when an endpoint is on, so a deployment without the Login half
/// exports none of its series.
pub fn routes<S: Clone + Send + Sync + 'static>(
    args: &LoginArgs,
    app_secrets: &[Secret],
    link: &BrokerLink,
    confirm_timeout: Duration,
    registry: &Registry,
) -> Result<Router<S>, IngestError> {
    args.validate().map_err(IngestError::Config)?;
    let (events, deletion) = if args.login_events_enabled() || args.data_deletion_enabled() {
        let metrics = LoginMetrics::new(registry)?;
        (
            LoginEvents::configured(args, link, confirm_timeout, &metrics),
            DataDeletion::configured(args, app_secrets, link, confirm_timeout, &metrics)?,
        )
    } else {
        (None, None)
    };
    Ok(Router::new()
        .merge(login_events::routes(events))
        .merge(data_deletion::routes(deletion))
        .layer(DefaultBodyLimit::max(MAX_LOGIN_BODY_BYTES)))
}
