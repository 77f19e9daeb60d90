//! The Login half as tests drive it: ingest with login events (and data deletion) on, login
//! events signed as the business backend signs them, and Meta's form posts.

use lc_ingest::RunningIngest;
use lc_ingest::login::LoginArgs;
use lc_meta::login::event_signature::{LOGIN_SIGNATURE_HEADER, sign_login_event};
use lc_meta::login::login_id::compute_login_id;
use lc_meta::secret::Secret;
use lc_shared::shutdown::Shutdown;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::pipeline::{PAGE, TestEnv, ingest_config, ms, start_ingest_with};

/// The shared secret the business backend signs login events with.
pub const LOGIN_SECRET: &str = "login-events-shared-secret";
/// The Login app.
pub const APP_ID: &str = "111111111111111";
/// Its client token.
pub const CLIENT_TOKEN: &str = "test-client-token";
/// A second configured page (data deletion derives a login_id for it too).
pub const OTHER_PAGE: &str = "9876543210";
/// Public base URL of the test ingest's data deletion status pages.
pub const STATUS_BASE: &str = "https://hooks.example.com/";

/// Login settings: login events on (with a previous secret too, as during a rotation); data
/// deletion on when `database_url` is given, since its status pages read the database.
pub fn login_args(database_url: Option<String>) -> LoginArgs {
    LoginArgs {
        login_events_secrets: vec![Secret::new("previous-secret"), Secret::new(LOGIN_SECRET)],
        login_events_max_skew_secs: 300,
        client_tokens: vec![
            format!("{APP_ID}={CLIENT_TOKEN}")
                .parse()
                .expect("token pair"),
        ],
        page_ids: vec![PAGE.to_owned(), OTHER_PAGE.to_owned()],
        data_deletion_base_url: database_url.as_ref().map(|_| STATUS_BASE.to_owned()),
        data_deletion_max_age_secs: 3600,
        database_url: database_url.map(Secret::new),
    }
}

impl TestEnv {
    /// Starts ingest on this vhost with the Login half configured as `login`.
    pub async fn start_ingest_with_login(&self, login: LoginArgs) -> (RunningIngest, Shutdown) {
        let mut config = ingest_config(self.vhost.url());
        config.login = login;
        start_ingest_with(config).await
    }

    /// Starts ingest with login events on and data deletion on this test's database.
    pub async fn start_login_ingest(&self) -> (RunningIngest, Shutdown) {
        self.start_ingest_with_login(login_args(Some(self.db.url())))
            .await
    }
}

/// The login_id the test Login app computes for `asid` on `page`.
pub fn login_id_for(asid: &str, page: &str) -> String {
    compute_login_id(&Secret::new(CLIENT_TOKEN), asid, APP_ID, page)
}

/// A login event body.
pub fn login_event_body(asid: &str, page: &str, at: OffsetDateTime) -> Vec<u8> {
    serde_json::to_vec(&json!({"asid": asid, "app_id": APP_ID, "page_id": page,
                               "logged_in_at": ms(at)}))
    .expect("json")
}

/// The signature header of `body`, signed now with [`LOGIN_SECRET`].
pub fn sign_now(body: &[u8]) -> String {
    sign_login_event(
        LOGIN_SECRET,
        OffsetDateTime::now_utc().unix_timestamp(),
        body,
    )
}

/// Posts a login event with `signature` (none: no header); returns the status and JSON body.
pub async fn post_login_event(
    ingest: &RunningIngest,
    body: &[u8],
    signature: Option<&str>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/login-events", ingest.addr))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(sig) = signature {
        req = req.header(LOGIN_SIGNATURE_HEADER, sig);
    }
    let resp = req.send().await.expect("post login event");
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(Value::Null);
    (status, json)
}

/// Posts `pairs` form-encoded (as Meta posts `signed_request`) to `path` on ingest; returns
/// the status and JSON body.
pub async fn post_form(ingest: &RunningIngest, path: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
    let mut encoder = reqwest::Url::parse("http://form.invalid/").expect("url");
    encoder.query_pairs_mut().extend_pairs(pairs);
    let body = encoder.query().unwrap_or_default().to_owned();
    let resp = reqwest::Client::new()
        .post(format!("http://{}{path}", ingest.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("post form");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}
