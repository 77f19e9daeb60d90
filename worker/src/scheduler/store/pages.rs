//! Page state shared by every replica: which pages exist with which send limit, their pauses
//! and throttles, the app-wide throttle, and page tokens set at run time.
//!
//! Every replica reads this state at each claim (through [`super::claim`]) and refreshes a
//! snapshot of the pauses at least once a second ([`load_pauses`]), so a pause written by one
//! replica stops the others' calls within a second and a resume restarts them as fast.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::Client;
use lc_shared::events::{
    OperationalEvent, PagePaused, PageResumed, PausedReason, ResumedBy, insert_operational,
};
use time::OffsetDateTime;

use super::{EVENT_SOURCE, StoreError};

/// Writes `page.resumed` for `page_id` in the caller's transaction.
async fn announce_resume(
    tx: &impl lc_shared::events::OutboxClient,
    page_id: &str,
    reason: PausedReason,
    resumed_by: ResumedBy,
    resumed_at: OffsetDateTime,
) -> Result<(), StoreError> {
    let event = OperationalEvent::PageResumed(PageResumed {
        page_id: page_id.to_owned(),
        app_id: String::new(),
        reason,
        resumed_by,
        resumed_at,
    });
    insert_operational(tx, &event, EVENT_SOURCE).await?;
    Ok(())
}

/// Writes `page.paused` for `page_id` in the caller's transaction.
async fn announce_pause(
    tx: &impl lc_shared::events::OutboxClient,
    page_id: &str,
    reason: PausedReason,
    since: OffsetDateTime,
    detail: Option<String>,
) -> Result<(), StoreError> {
    let event = OperationalEvent::PagePaused(PagePaused {
        page_id: page_id.to_owned(),
        app_id: String::new(),
        reason,
        since,
        detail,
    });
    insert_operational(tx, &event, EVENT_SOURCE).await?;
    Ok(())
}

/// Why a page is paused until someone acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PauseReason {
    /// Graph refused the page token (code 190): waits for a new token or `pages resume`.
    TokenInvalid,
    /// Graph says the page is restricted from sending (10/1893063): waits for `pages resume`.
    Restricted,
    /// An operator paused the page (admin API or `loginconnect pages pause`): waits for a
    /// resume; a new token does not lift it.
    Operator,
}

impl PauseReason {
    /// The value stored in `page_state.paused_reason` and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenInvalid => "token_invalid",
            Self::Restricted => "restricted",
            Self::Operator => "operator",
        }
    }

    /// The reason stored as `s` (`None` for a value this version does not know).
    pub fn parse(s: &str) -> Option<Self> {
        [Self::TokenInvalid, Self::Restricted, Self::Operator]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

impl From<PauseReason> for PausedReason {
    fn from(r: PauseReason) -> Self {
        match r {
            PauseReason::TokenInvalid => Self::TokenInvalid,
            PauseReason::Restricted => Self::Restricted,
            PauseReason::Operator => Self::Operator,
        }
    }
}

impl fmt::Display for PauseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Makes sure `page_ids` have a state row; new rows get `rate_limit` (existing ones keep
/// theirs). For tools and tests that write opt-ins directly; the scheduler uses [`sync`].
pub async fn ensure(client: &Client, page_ids: &[&str], rate_limit: u32) -> Result<(), StoreError> {
    let rate = i32::try_from(rate_limit).unwrap_or(i32::MAX);
    client
        .execute(
            "INSERT INTO page_state (page_id, rate_limit) SELECT unnest($1::text[]), $2 \
             ON CONFLICT (page_id) DO NOTHING",
            &[&page_ids, &rate],
        )
        .await?;
    Ok(())
}

/// A page the scheduler knows, as configured on one replica.
#[derive(Debug, Clone)]
pub struct PageSync<'a> {
    /// The page.
    pub page_id: &'a str,
    /// Fingerprint of the token this replica would call with.
    pub token_fingerprint: String,
    /// Send API calls per second: the registry's limit of the page, else `PAGE_RATE_LIMIT`.
    pub rate_limit: u32,
}

/// Makes sure every configured page has its state row with its rate limit, and resumes token
/// pauses of pages whose token is now another one than the one Graph refused, announcing
/// each (`page.resumed`, in the same transaction). Returns the pages resumed. (Every replica
/// runs this at start and after each configuration change; for a page without a limit of its
/// own the last one to start sets the rate, so give every replica the same
/// `PAGE_RATE_LIMIT`.)
pub async fn sync(client: &mut Client, pages: &[PageSync<'_>]) -> Result<Vec<String>, StoreError> {
    let ids: Vec<&str> = pages.iter().map(|p| p.page_id).collect();
    let prints: Vec<&str> = pages.iter().map(|p| p.token_fingerprint.as_str()).collect();
    let rates: Vec<i32> = pages
        .iter()
        .map(|p| i32::try_from(p.rate_limit).unwrap_or(i32::MAX))
        .collect();
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO page_state (page_id, rate_limit) \
         SELECT * FROM unnest($1::text[], $2::integer[]) \
         ON CONFLICT (page_id) DO UPDATE SET rate_limit = EXCLUDED.rate_limit, \
             updated_at = now() \
         WHERE page_state.rate_limit <> EXCLUDED.rate_limit",
        &[&ids, &rates],
    )
    .await?;
    let rows = tx
        .query(
            "UPDATE page_state p SET paused_reason = NULL, paused_since = NULL, \
                 paused_detail = NULL, paused_token = NULL, updated_at = now() \
             FROM unnest($1::text[], $2::text[]) AS c(page_id, token) \
             WHERE p.page_id = c.page_id AND p.paused_reason = 'token_invalid' \
               AND p.paused_token IS DISTINCT FROM c.token \
             RETURNING p.page_id, now()",
            &[&ids, &prints],
        )
        .await?;
    let mut resumed = Vec::with_capacity(rows.len());
    for r in &rows {
        let page_id: String = r.get(0);
        let at = r.get(1);
        announce_resume(
            &*tx,
            &page_id,
            PausedReason::TokenInvalid,
            ResumedBy::NewToken,
            at,
        )
        .await?;
        resumed.push(page_id);
    }
    tx.commit().await?;
    Ok(resumed)
}

/// Records the app id the scheduler was given (`META_APP_ID`) for the `appid` attribute of
/// every process's events (see [`lc_shared::events::app_of_page_sql`]).
pub async fn set_meta_app_id(client: &Client, app_id: &str) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE app_state SET meta_app_id = $1, updated_at = now() \
             WHERE app_id = 'default' AND meta_app_id IS DISTINCT FROM $1",
            &[&app_id],
        )
        .await?;
    Ok(())
}

/// Pauses a page (idempotent: the first pause's time and detail stay; a token pause for a
/// token other than the one stored with `pages set-token` is not one). Returns true if this
/// call paused it (it was not paused before); only then is `page.paused` written, in the same
/// transaction, so a pause is announced once however many replicas meet the same error.
pub async fn pause(
    client: &mut Client,
    page_id: &str,
    reason: PauseReason,
    token_fingerprint: Option<&str>,
    detail: &str,
) -> Result<bool, StoreError> {
    let tx = client.transaction().await?;
    // A concurrent pause waits for this row lock, then finds `paused_reason` set: no row.
    // A refusal of a token other than the one stored now (a call still in flight when
    // `pages set-token` stored a new one) says nothing about the new token: no pause, so
    // no pause–resume flap announced to consumers.
    let row = tx
        .query_opt(
            "UPDATE page_state SET paused_reason = $2, paused_since = now(), paused_detail = $3, \
                 paused_token = $4, updated_at = now() \
             WHERE page_id = $1 AND paused_reason IS NULL \
               AND NOT ($2 = 'token_invalid' AND $4::text IS NOT NULL AND EXISTS ( \
                   SELECT 1 FROM page_tokens t WHERE t.page_id = $1 AND t.fingerprint <> $4)) \
             RETURNING paused_since",
            &[&page_id, &reason.as_str(), &detail, &token_fingerprint],
        )
        .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    announce_pause(
        &*tx,
        page_id,
        reason.into(),
        row.get(0),
        Some(detail.to_owned()),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Lifts a page's pause and throttle (an operator's `pages resume`), announcing what it
/// lifted (`page.resumed` for the pause and for an announced throttle). Returns whether the
/// page exists.
pub async fn resume(client: &mut Client, page_id: &str) -> Result<bool, StoreError> {
    let tx = client.transaction().await?;
    // Locked, so what it read is what it lifts (a concurrent pause waits for the commit).
    let Some(before) = tx
        .query_opt(
            "SELECT paused_reason, throttle_announced_at IS NOT NULL, now() FROM page_state \
             WHERE page_id = $1 FOR UPDATE",
            &[&page_id],
        )
        .await?
    else {
        return Ok(false);
    };
    tx.execute(
        "UPDATE page_state SET paused_reason = NULL, paused_since = NULL, \
             paused_detail = NULL, paused_token = NULL, throttled_until = NULL, \
             throttle_announced_at = NULL, updated_at = now() \
         WHERE page_id = $1",
        &[&page_id],
    )
    .await?;
    let now: OffsetDateTime = before.get(2);
    if let Some(reason) = before
        .get::<_, Option<&str>>(0)
        .and_then(PauseReason::parse)
    {
        announce_resume(&*tx, page_id, reason.into(), ResumedBy::Operator, now).await?;
    }
    if before.get::<_, bool>(1) {
        let throttled = PausedReason::Throttled;
        announce_resume(&*tx, page_id, throttled, ResumedBy::Operator, now).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Throttles a page for `for_how_long` (extends, never shortens, a current throttle). A
/// throttle that starts on a page not throttled before is announced (`page.paused`, reason
/// `throttled`) once; [`announce_throttle_ends`] announces its end.
pub async fn throttle(
    client: &mut Client,
    page_id: &str,
    for_how_long: Duration,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "UPDATE page_state SET throttled_until = GREATEST(COALESCE(throttled_until, now()), \
                 now() + make_interval(secs => $2)), updated_at = now() \
             WHERE page_id = $1 \
             RETURNING throttle_announced_at IS NULL, throttled_until",
            &[&page_id, &for_how_long.as_secs_f64()],
        )
        .await?;
    if let Some(row) = row.filter(|r| r.get::<_, bool>(0)) {
        // Guarded again under the row lock this transaction now holds: a concurrent throttle
        // of another replica waits here and then finds the throttle announced.
        let announced = tx
            .query_opt(
                "UPDATE page_state SET throttle_announced_at = now() \
                 WHERE page_id = $1 AND throttle_announced_at IS NULL RETURNING now()",
                &[&page_id],
            )
            .await?;
        if let Some(at) = announced {
            let until: OffsetDateTime = row.get(1);
            let detail = until
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| format!("throttled by Graph until {t}"));
            announce_pause(&*tx, page_id, PausedReason::Throttled, at.get(0), detail).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Announces the end of every announced throttle that is over (`page.resumed`, reason
/// `throttled`), once: each page's row is cleared and its event written in one transaction,
/// and a replica running this at the same moment finds nothing left to clear. Every replica
/// runs it with its pause refresh (once a second); the partial index keeps it cheap. Returns
/// the pages resumed.
pub async fn announce_throttle_ends(client: &mut Client) -> Result<Vec<String>, StoreError> {
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "UPDATE page_state SET throttle_announced_at = NULL \
             WHERE throttle_announced_at IS NOT NULL \
               AND (throttled_until IS NULL OR throttled_until <= now()) \
             RETURNING page_id, COALESCE(throttled_until, now())",
            &[],
        )
        .await?;
    let mut pages = Vec::with_capacity(rows.len());
    for r in &rows {
        let page_id: String = r.get(0);
        let ended = ResumedBy::ThrottleEnded;
        announce_resume(&*tx, &page_id, PausedReason::Throttled, ended, r.get(1)).await?;
        pages.push(page_id);
    }
    tx.commit().await?;
    Ok(pages)
}

/// Throttles every page of the app for `for_how_long` (Graph code 4 is app-wide).
pub async fn throttle_app(client: &Client, for_how_long: Duration) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE app_state SET throttled_until = GREATEST(COALESCE(throttled_until, now()), \
                 now() + make_interval(secs => $1)), updated_at = now() \
             WHERE app_id = 'default'",
            &[&for_how_long.as_secs_f64()],
        )
        .await?;
    Ok(())
}

/// Sets how far below its limit a page (or, with `page_id` `None`, the whole app) sends,
/// from Graph's usage headers. Written only when it moves by more than a twentieth, so
/// steady usage costs no writes.
pub async fn set_rate_factor(
    client: &Client,
    page_id: Option<&str>,
    factor: f64,
) -> Result<(), StoreError> {
    let factor = factor.clamp(0.01, 1.0) as f32;
    match page_id {
        Some(page) => {
            client
                .execute(
                    "UPDATE page_state SET rate_factor = $2, updated_at = now() \
                     WHERE page_id = $1 AND abs(rate_factor - $2) > 0.05",
                    &[&page, &factor],
                )
                .await?
        }
        None => {
            client
                .execute(
                    "UPDATE app_state SET rate_factor = $1, updated_at = now() \
                     WHERE app_id = 'default' AND abs(rate_factor - $1) > 0.05",
                    &[&factor],
                )
                .await?
        }
    };
    Ok(())
}

/// One page's pause or throttle, as every replica sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PageHold {
    /// The page; `None` for the app-wide throttle.
    pub page_id: Option<String>,
    /// Why it is paused, if it is.
    pub paused: Option<PauseReason>,
    /// Until when it is throttled, if it is.
    pub throttled_until: Option<OffsetDateTime>,
}

/// Every page paused or throttled now, and the app-wide throttle (`page_id` `None`).
pub async fn load_pauses(client: &Client) -> Result<Vec<PageHold>, StoreError> {
    let rows = client
        .query(
            "SELECT page_id, paused_reason, \
                 CASE WHEN throttled_until > now() THEN throttled_until END \
             FROM page_state WHERE paused_reason IS NOT NULL OR throttled_until > now() \
             UNION ALL \
             SELECT NULL, NULL, throttled_until FROM app_state \
             WHERE app_id = 'default' AND throttled_until > now()",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| PageHold {
            page_id: r.get(0),
            paused: r.get::<_, Option<&str>>(1).and_then(PauseReason::parse),
            throttled_until: r.get(2),
        })
        .collect())
}

/// A page token as stored: encrypted, with the id of the key that encrypted it.
#[derive(Debug, Clone)]
pub struct StoredToken {
    /// The page.
    pub page_id: String,
    /// The key's id.
    pub key_id: String,
    /// AES-GCM nonce.
    pub nonce: Vec<u8>,
    /// Encrypted token with its tag.
    pub ciphertext: Vec<u8>,
    /// Fingerprint of the plain token (to compare with a refused one; not the token).
    pub fingerprint: String,
    /// When it was stored.
    pub updated_at: OffsetDateTime,
}

/// Stores a page's token and, with `lift_token_pause` (a new token, not a re-encryption),
/// lifts its token pause in the same transaction, so every replica calls with the new token
/// from its next refresh on.
pub async fn store_token(
    client: &mut Client,
    token: &StoredToken,
    lift_token_pause: bool,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO page_tokens (page_id, key_id, nonce, ciphertext, fingerprint, updated_at) \
         VALUES ($1, $2, $3, $4, $5, clock_timestamp()) \
         ON CONFLICT (page_id) DO UPDATE SET key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce, \
             ciphertext = EXCLUDED.ciphertext, fingerprint = EXCLUDED.fingerprint, \
             updated_at = EXCLUDED.updated_at",
        &[
            &token.page_id,
            &token.key_id,
            &token.nonce,
            &token.ciphertext,
            &token.fingerprint,
        ],
    )
    .await?;
    if lift_token_pause {
        let lifted = tx
            .query_opt(
                "UPDATE page_state SET paused_reason = NULL, paused_since = NULL, \
                     paused_detail = NULL, paused_token = NULL, updated_at = now() \
                 WHERE page_id = $1 AND paused_reason = 'token_invalid' RETURNING now()",
                &[&token.page_id],
            )
            .await?;
        if let Some(row) = lifted {
            let (reason, by) = (PausedReason::TokenInvalid, ResumedBy::NewToken);
            announce_resume(&*tx, &token.page_id, reason, by, row.get(0)).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Every stored page token (a replica decrypts the ones newer than what it holds).
pub async fn load_tokens(client: &Client) -> Result<Vec<StoredToken>, StoreError> {
    let rows = client
        .query(
            "SELECT page_id, key_id, nonce, ciphertext, fingerprint, updated_at FROM page_tokens",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StoredToken {
            page_id: r.get(0),
            key_id: r.get(1),
            nonce: r.get(2),
            ciphertext: r.get(3),
            fingerprint: r.get(4),
            updated_at: r.get(5),
        })
        .collect())
}
