//! User data deletion requests between ingest and the worker that applies them.
//!
//! Ingest verifies Meta's data deletion callback, derives the person's `login_id`s and puts
//! one [`DeletionRequest`] on the durable quorum queue [`DELETION_QUEUE`] (declared with the
//! rest of the topology by `lc_shared::topology`), with publisher confirms like webhook
//! events. The scheduler process consumes it, deletes the person's opt-ins and links, writes
//! an `identity.deleted` event per `login_id` to the outbox and records a receipt under the
//! confirmation code, all in one transaction. Ingest stays free of writes.
//!
//! Confirmation codes are self-authenticating ([`ConfirmationCodes`]): a random part and a
//! MAC of it keyed by the app secrets, so the status endpoint can tell "pending" (a code it
//! issued whose receipt is not written yet) from "unknown" without any shared state.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::secret::Secret;

/// The work queue of deletion requests, consumed by the scheduler.
pub const DELETION_QUEUE: &str = "scheduler.deletions";

/// Bytes of randomness in a confirmation code.
const CODE_RANDOM_BYTES: usize = 16;
/// Bytes of MAC in a confirmation code.
const CODE_TAG_BYTES: usize = 8;
/// Domain separation: the app secret keys other MACs too (webhooks, signed_request).
const CODE_DOMAIN: &[u8] = b"loginconnect/data-deletion-code/v1:";
/// Domain of the code's first part when it is derived from the request (see
/// [`ConfirmationCodes::for_request`]).
const REQUEST_DOMAIN: &[u8] = b"loginconnect/data-deletion-request/v1:";

/// One identity to delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionIdentity {
    /// The Page.
    pub page_id: String,
    /// The person's login_id for that Page.
    pub login_id: String,
}

/// The body of a message on [`DELETION_QUEUE`]. It carries derived `login_id`s only, never
/// the app-scoped user id it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionRequest {
    /// The code Meta shows the person; also the AMQP `message_id` and the receipt's key.
    pub confirmation_code: String,
    /// When ingest accepted the request.
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// Every (page, login_id) the person may have, one per configured app and page.
    pub identities: Vec<DeletionIdentity>,
}

/// Issues and checks confirmation codes: `hex(random 16 bytes) ‖ hex(first 8 bytes of
/// HMAC-SHA256(app secret, domain ‖ random))`, 48 lowercase hex characters. Any configured
/// app secret validates (rotation); the first one issues.
#[derive(Clone)]
pub struct ConfirmationCodes {
    keys: Vec<Hmac<Sha256>>,
}

impl std::fmt::Debug for ConfirmationCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmationCodes")
            .field("secrets", &self.keys.len())
            .finish()
    }
}

impl ConfirmationCodes {
    /// Codes keyed by `secrets` (the app secrets).
    pub fn new(secrets: &[Secret]) -> Self {
        let keys = secrets
            .iter()
            // HMAC accepts keys of any length, so no secret is ever dropped here.
            .filter_map(|s| Hmac::<Sha256>::new_from_slice(s.expose().as_bytes()).ok())
            .collect();
        Self { keys }
    }

    fn tag(key: &Hmac<Sha256>, random: &[u8]) -> Hmac<Sha256> {
        let mut mac = key.clone();
        mac.update(CODE_DOMAIN);
        mac.update(random);
        mac
    }

    /// A new code, or `None` when no secret is configured.
    pub fn issue(&self) -> Option<String> {
        let key = self.keys.first()?;
        let random: Vec<u8> = uuid::Uuid::new_v4().as_bytes().to_vec();
        let tag = Self::tag(key, &random).finalize().into_bytes();
        Some(format!(
            "{}{}",
            hex::encode(&random),
            hex::encode(&tag[..CODE_TAG_BYTES])
        ))
    }

    /// The code of the deletion request of app-scoped user `user_id` issued at `issued_at`
    /// (unix seconds), or `None` when no secret is configured. The same request always gets
    /// the same code — its first part is a MAC of (user_id, issued_at) rather than random — so
    /// a callback posted again is the same request downstream (one receipt, one set of
    /// `identity.deleted` events) and gets the same answer. The code reveals nothing of the
    /// user id without the app secret.
    pub fn for_request(&self, user_id: &str, issued_at: i64) -> Option<String> {
        let key = self.keys.first()?;
        let mut mac = key.clone();
        mac.update(REQUEST_DOMAIN);
        mac.update(format!("{user_id}:{issued_at}").as_bytes());
        let seed = mac.finalize().into_bytes();
        let random = &seed[..CODE_RANDOM_BYTES];
        let tag = Self::tag(key, random).finalize().into_bytes();
        Some(format!(
            "{}{}",
            hex::encode(random),
            hex::encode(&tag[..CODE_TAG_BYTES])
        ))
    }

    /// True if `code` was issued with one of the secrets (constant-time per secret).
    pub fn is_valid(&self, code: &str) -> bool {
        let split = CODE_RANDOM_BYTES * 2;
        if code.len() != (CODE_RANDOM_BYTES + CODE_TAG_BYTES) * 2
            || !code
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return false;
        }
        let (Ok(random), Ok(tag)) = (hex::decode(&code[..split]), hex::decode(&code[split..]))
        else {
            return false;
        };
        let mut valid = false;
        for key in &self.keys {
            valid |= Self::tag(key, &random).verify_truncated_left(&tag).is_ok();
        }
        valid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_validate_with_any_secret_and_only_when_untouched() {
        let old = ConfirmationCodes::new(&[Secret::new("old")]);
        let both = ConfirmationCodes::new(&[Secret::new("new"), Secret::new("old")]);
        let code = old.issue().expect("code");
        assert_eq!(code.len(), 48);
        assert!(old.is_valid(&code));
        assert!(
            both.is_valid(&code),
            "rotation: the old secret still validates"
        );
        assert!(!ConfirmationCodes::new(&[Secret::new("x")]).is_valid(&code));
        let mut tampered = code.clone().into_bytes();
        tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
        assert!(!old.is_valid(&String::from_utf8(tampered).expect("ascii")));
        assert!(!old.is_valid(&code.to_uppercase()));
        assert!(!old.is_valid(&code[..40]));
        assert!(!old.is_valid("../../etc/passwd"));
        assert_ne!(old.issue(), old.issue());
        assert_eq!(ConfirmationCodes::new(&[]).issue(), None);
    }

    #[test]
    fn a_request_always_gets_the_same_valid_code() {
        let codes = ConfirmationCodes::new(&[Secret::new("s")]);
        let a = codes.for_request("123", 1_700_000_000).expect("code");
        assert_eq!(codes.for_request("123", 1_700_000_000), Some(a.clone()));
        assert!(codes.is_valid(&a));
        assert_ne!(codes.for_request("123", 1_700_000_001), Some(a.clone()));
        assert_ne!(codes.for_request("124", 1_700_000_000), Some(a.clone()));
        assert_ne!(
            ConfirmationCodes::new(&[Secret::new("t")]).for_request("123", 1_700_000_000),
            Some(a)
        );
    }

    #[test]
    fn request_round_trips_as_json() {
        let req = DeletionRequest {
            confirmation_code: "c".into(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
            identities: vec![DeletionIdentity {
                page_id: "1".into(),
                login_id: "L".into(),
            }],
        };
        let json = serde_json::to_string(&req).expect("json");
        assert!(json.contains("\"requested_at\":\"1970-01-01T00:00:00Z\""));
        assert_eq!(
            serde_json::from_str::<DeletionRequest>(&json).expect("back"),
            req
        );
    }
}
