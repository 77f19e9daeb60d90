//! App binding: a delivery's entries are accepted only for the pages whose app signed it.
//!
//! A technology provider runs one deployment for many client businesses, each with its own
//! Meta app. The page registry binds a page to its app (`pages.app_id`) and names the
//! environment variable holding each app's secret (`apps.app_secret_env`). Ingest verifies
//! a delivery's signature with every secret it knows — `META_APP_SECRETS` and the secrets
//! of the registered apps — and notes which apps' secrets produced it. Then, entry by entry:
//! - a page bound to an app is accepted only if that app's secret signed the delivery; an
//!   entry that fails is set aside alone on `messenger.unparsed` with the reason (see
//!   [`Refusal`]), counted in `ingest_entries_refused_total{reason}` and logged with the
//!   page and the apps (never a secret), while the rest of the delivery goes on and Meta is
//!   answered 200 — a 4xx would make Meta retry for hours and then unsubscribe the app, for
//!   what is a configuration error on our side;
//! - a page not bound to an app (not in the registry, or the deployment's own app): any
//!   known secret, as before.
//!
//! Without `DATABASE_URL`, or with no app in the registry, nothing here changes a delivery.
//!
//! Rooms: [`keys`] (the secrets and whose they are), [`entries`] (a body split by page),
//! [`watch`] (the bindings kept current from the registry).

pub mod entries;
pub mod keys;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;

use lc_meta::secret::Secret;
use lc_shared::outgoing::{self, Outgoing};

use self::keys::{Keys, Verified};

/// A verified body with the entries its signers may not sign taken out.
#[derive(Debug, Default)]
pub struct Screened {
    /// The body without those entries; `None` when none was taken out (use the original).
    pub kept: Option<Vec<u8>>,
    /// Each entry taken out, alone, for `messenger.unparsed`, the reason in its header.
    pub set_aside: Vec<Outgoing>,
    /// Their reasons ([`Refusal::reason`]), to count once the broker confirmed them.
    pub reasons: Vec<&'static str>,
}

/// Takes out of `body` (verified as `verified`) every entry whose page is bound to an app
/// that did not sign it, each logged with the page and the apps (see the module doc).
pub fn screen(keys: &Keys, verified: &Verified<'_>, body: &[u8], traceparent: &str) -> Screened {
    if !keys.any_binding() {
        return Screened::default();
    }
    let split = entries::split(body, |page| verified.check(page));
    let signed_by = verified.signed_by();
    let mut out = Screened {
        kept: split.kept,
        ..Screened::default()
    };
    for entry in split.taken_out {
        let text = entry.why.describe(&entry.page_id, &signed_by);
        tracing::warn!(page_id = %entry.page_id, signed_by = ?signed_by, reason = entry.why.reason(), "webhook entry set aside on messenger.unparsed: {text}");
        out.set_aside
            .push(outgoing::unparsed_message(&entry.body, &text, traceparent));
        out.reasons.push(entry.why.reason());
    }
    out
}

/// Why an entry of a signed delivery was not accepted for its page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The page is bound to an app whose secret did not sign the delivery (another app's
    /// did).
    OtherApp {
        /// The page's app.
        page_app: String,
    },
    /// The page is bound to an app whose secret variable is not set on this ingest, so no
    /// delivery for the page can be accepted until it is.
    AppSecretNotSet {
        /// The page's app.
        page_app: String,
        /// The variable the app names.
        var: String,
    },
}

impl Refusal {
    /// Every reason, for zero series.
    pub const REASONS: [&'static str; 2] = ["page_bound_to_other_app", "app_secret_not_set"];

    /// The reason as counted and written on the set-aside message.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OtherApp { .. } => Self::REASONS[0],
            Self::AppSecretNotSet { .. } => Self::REASONS[1],
        }
    }

    /// What an operator reads (header of the set-aside message, log line): the page, its
    /// app, who signed, what to do. `signed_by` lists the apps whose secret signed
    /// (`META_APP_SECRETS` for the deployment's own secrets).
    pub fn describe(&self, page_id: &str, signed_by: &[String]) -> String {
        match self {
            Self::OtherApp { page_app } => format!(
                "{}: page {page_id} is bound to app {page_app} but the delivery was signed by {}; \
                 if the page moved to that app, bind it there (admin API or `loginconnect pages \
                 update`), else the signing app's webhook subscription includes a page it should not",
                self.reason(),
                signed_by.join(", ")
            ),
            Self::AppSecretNotSet { page_app, var } => format!(
                "{}: page {page_id} is bound to app {page_app}, whose secret variable {var} is not \
                 set on this ingest; set it and restart ingest",
                self.reason()
            ),
        }
    }
}

/// Where ingest finds the secrets the registry's apps name: variables given explicitly
/// (tests, embedding) first, then the process environment.
#[derive(Clone, Default)]
pub struct SecretVars {
    given: Arc<HashMap<String, Secret>>,
}

impl std::fmt::Debug for SecretVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.given.keys().collect();
        names.sort();
        f.debug_struct("SecretVars").field("given", &names).finish()
    }
}

impl SecretVars {
    /// Variables that win over the process environment.
    pub fn given(vars: impl IntoIterator<Item = (String, Secret)>) -> Self {
        Self {
            given: Arc::new(vars.into_iter().collect()),
        }
    }

    /// The secret in variable `name`, trimmed; `None` when unset or blank.
    pub fn get(&self, name: &str) -> Option<Secret> {
        let value = match self.given.get(name) {
            Some(s) => s.expose().trim().to_owned(),
            None => std::env::var(name).ok()?.trim().to_owned(),
        };
        (!value.is_empty()).then(|| Secret::new(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_page_apps_and_what_to_do() {
        let other = Refusal::OtherApp {
            page_app: "2".into(),
        };
        let text = other.describe("20", &["1".into(), "META_APP_SECRETS".into()]);
        assert!(text.starts_with("page_bound_to_other_app: page 20 is bound to app 2"));
        assert!(text.contains("signed by 1, META_APP_SECRETS"), "{text}");
        let unset = Refusal::AppSecretNotSet {
            page_app: "3".into(),
            var: "C_SECRET".into(),
        };
        assert!(unset.describe("30", &[]).contains("C_SECRET is not set"));
    }

    #[test]
    fn given_variables_win_and_are_never_shown() {
        let vars = SecretVars::given([("LC_BINDING_TEST_VAR".to_owned(), Secret::new(" s3cr3t "))]);
        assert_eq!(
            vars.get("LC_BINDING_TEST_VAR")
                .map(|s| s.expose().to_owned()),
            Some("s3cr3t".to_owned())
        );
        assert!(vars.get("LC_BINDING_TEST_UNSET_VAR").is_none());
        let shown = format!("{vars:?}");
        assert!(shown.contains("LC_BINDING_TEST_VAR") && !shown.contains("s3cr3t"));
    }
}
