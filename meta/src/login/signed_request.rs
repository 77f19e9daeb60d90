//! Meta's `signed_request`, as posted to the user data deletion callback.
//!
//! Format: `<base64url signature>.<base64url payload>`, where the signature is
//! HMAC-SHA256 of the *encoded* payload part keyed by the app secret, and the payload is JSON
//! with `algorithm: "HMAC-SHA256"`, `user_id` (the app-scoped user id) and `issued_at` (unix
//! seconds). Base64url is accepted with or without `=` padding.
//!
//! The signature is checked before the payload is decoded, so nothing unauthenticated is
//! parsed beyond the outer structure.
//!
//! Facebook Login hands every visitor who logs in a `signed_request` of the same format and
//! key (the JS SDK's `authResponse.signedRequest`, the `fbsr_<app>` cookie), which carries
//! `code` (or `oauth_token`). [`parse_deletion_callback`] accepts only what Meta's deletion
//! callback is: no such field, and a fresh `issued_at`.

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE_NO_PAD, URL_SAFE_PAD_INDIFFERENT};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::login::login_id::is_facebook_id;
use crate::secret::Secret;

/// Longest `signed_request` accepted (Meta's are a few hundred bytes).
pub const MAX_SIGNED_REQUEST_LEN: usize = 8 * 1024;

/// A verified `signed_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// The person's app-scoped user id (digits).
    pub user_id: String,
    /// When Meta issued the request (unix seconds), when given.
    pub issued_at: Option<i64>,
    /// `code` or `oauth_token` when the payload carries one: the marks of Facebook Login's
    /// own `signed_request`.
    pub login_field: Option<&'static str>,
}

/// Why a `signed_request` was refused. Texts are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedRequestError {
    /// Not `<base64url>.<base64url>`, or the payload is not what Meta sends.
    #[error("malformed signed_request: {0}")]
    Malformed(String),
    /// Well-formed, but no configured app secret produces the signature.
    #[error("signed_request signature does not match any configured app secret")]
    BadSignature,
    /// Authentic, but Facebook Login's own `signed_request` (it carries `field`), not Meta's
    /// data deletion callback.
    #[error(
        "this signed_request carries `{field}`: it is Facebook Login's, not a data deletion callback"
    )]
    NotADeletionCallback {
        /// `code` or `oauth_token`.
        field: &'static str,
    },
    /// Authentic, but `issued_at` is too far from now: a replay, or not a callback at all.
    #[error(
        "issued_at is {age_secs} s before now; a deletion callback may be at most {max_secs} s old and not from the future"
    )]
    Stale {
        /// Now minus `issued_at`, in seconds (negative: in the future).
        age_secs: i64,
        /// The largest age allowed.
        max_secs: u64,
    },
}

/// How far in the future `issued_at` may be (clock skew between Meta and us).
pub const MAX_FUTURE_SKEW_SECS: i64 = 300;

/// Verifies a data deletion callback's `signed_request` ([`parse_signed_request`]) and
/// accepts it only if it is one: no Login `code` or `oauth_token`, and an `issued_at` at most
/// `max_age_secs` before `now` (unix seconds) and at most [`MAX_FUTURE_SKEW_SECS`] after it.
pub fn parse_deletion_callback(
    value: &str,
    secrets: &[Secret],
    now: i64,
    max_age_secs: u64,
) -> Result<SignedRequest, SignedRequestError> {
    let request = parse_signed_request(value, secrets)?;
    if let Some(field) = request.login_field {
        return Err(SignedRequestError::NotADeletionCallback { field });
    }
    let issued_at = request
        .issued_at
        .ok_or_else(|| malformed("issued_at is missing"))?;
    let age = now.saturating_sub(issued_at);
    let max = i64::try_from(max_age_secs).unwrap_or(i64::MAX);
    if age > max || age < -MAX_FUTURE_SKEW_SECS {
        return Err(SignedRequestError::Stale {
            age_secs: age,
            max_secs: max_age_secs,
        });
    }
    Ok(request)
}

fn malformed(reason: impl Into<String>) -> SignedRequestError {
    SignedRequestError::Malformed(reason.into())
}

/// Verifies `value` against each of `secrets` and returns its payload.
pub fn parse_signed_request(
    value: &str,
    secrets: &[Secret],
) -> Result<SignedRequest, SignedRequestError> {
    let value = value.trim();
    if value.len() > MAX_SIGNED_REQUEST_LEN {
        return Err(malformed("too long"));
    }
    let (sig_part, payload_part) = value
        .split_once('.')
        .ok_or_else(|| malformed("expected <signature>.<payload>"))?;
    if sig_part.is_empty() || payload_part.is_empty() {
        return Err(malformed("expected <signature>.<payload>"));
    }
    let signature = URL_SAFE_PAD_INDIFFERENT
        .decode(sig_part)
        .map_err(|_| malformed("the signature is not base64url"))?;
    if signature.len() != 32 {
        return Err(malformed("the signature is not 32 bytes (HMAC-SHA256)"));
    }
    let mut matched = false;
    // Every secret is tried, so timing does not reveal which one matched.
    for secret in secrets {
        if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
            mac.update(payload_part.as_bytes());
            matched |= mac.verify_slice(&signature).is_ok();
        }
    }
    if !matched {
        return Err(SignedRequestError::BadSignature);
    }
    let payload = URL_SAFE_PAD_INDIFFERENT
        .decode(payload_part)
        .map_err(|_| malformed("the payload is not base64url"))?;
    let payload: Value =
        serde_json::from_slice(&payload).map_err(|_| malformed("the payload is not JSON"))?;
    let algorithm = payload.get("algorithm").and_then(Value::as_str);
    if !algorithm.is_some_and(|a| a.eq_ignore_ascii_case("HMAC-SHA256")) {
        return Err(malformed("algorithm must be HMAC-SHA256"));
    }
    let user_id = match payload.get("user_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        _ => return Err(malformed("user_id is missing")),
    };
    if !is_facebook_id(&user_id) {
        return Err(malformed("user_id must be digits"));
    }
    let issued_at = payload.get("issued_at").and_then(Value::as_i64);
    let login_field = ["code", "oauth_token"]
        .into_iter()
        .find(|f| payload.get(*f).is_some_and(|v| !v.is_null()));
    Ok(SignedRequest {
        user_id,
        issued_at,
        login_field,
    })
}

/// Builds a `signed_request` for `payload` the way Meta does (unpadded base64url); used by
/// tests and for trying the endpoint by hand.
pub fn sign_request(secret: &str, payload: &Value) -> String {
    let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
    let sig = crate::signature::hmac_sha256(secret.as_bytes(), payload.as_bytes());
    format!("{}.{payload}", URL_SAFE_NO_PAD.encode(sig))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn secrets(s: &[&str]) -> Vec<Secret> {
        s.iter().map(|s| Secret::new(*s)).collect()
    }

    fn payload() -> Value {
        json!({"algorithm": "HMAC-SHA256", "expires": 0, "issued_at": 1_700_000_000,
               "user_id": "1234567890"})
    }

    #[test]
    fn verifies_with_any_configured_secret() {
        let req = sign_request("new", &payload());
        let parsed = parse_signed_request(&req, &secrets(&["old", "new"])).expect("valid");
        assert_eq!(parsed.user_id, "1234567890");
        assert_eq!(parsed.issued_at, Some(1_700_000_000));
        assert_eq!(
            parse_signed_request(&req, &secrets(&["other"])),
            Err(SignedRequestError::BadSignature)
        );
    }

    #[test]
    fn accepts_padding_and_numeric_user_ids() {
        let p = json!({"algorithm": "HMAC-SHA256", "user_id": 42});
        let payload = base64::engine::general_purpose::URL_SAFE.encode(p.to_string());
        let sig = crate::signature::hmac_sha256(b"s", payload.as_bytes());
        let req = format!(
            "{}.{payload}",
            base64::engine::general_purpose::URL_SAFE.encode(sig)
        );
        let parsed = parse_signed_request(&req, &secrets(&["s"])).expect("valid");
        assert_eq!(parsed.user_id, "42");
        assert_eq!(parsed.issued_at, None);
    }

    #[test]
    fn a_changed_payload_fails_the_signature() {
        let req = sign_request("s", &payload());
        let (sig, _) = req.split_once('.').expect("dot");
        let mut other = payload();
        other["user_id"] = json!("999");
        let forged = format!("{sig}.{}", URL_SAFE_NO_PAD.encode(other.to_string()));
        assert_eq!(
            parse_signed_request(&forged, &secrets(&["s"])),
            Err(SignedRequestError::BadSignature)
        );
    }

    #[test]
    fn only_fresh_deletion_callbacks() {
        let s = secrets(&["s"]);
        let now = 1_700_000_000;
        let at = |issued_at: i64| {
            sign_request(
                "s",
                &json!({"algorithm": "HMAC-SHA256", "issued_at": issued_at, "user_id": "1"}),
            )
        };
        assert!(parse_deletion_callback(&at(now - 3600), &s, now, 3600).is_ok());
        assert!(parse_deletion_callback(&at(now + 300), &s, now, 3600).is_ok());
        assert!(matches!(
            parse_deletion_callback(&at(now - 3601), &s, now, 3600),
            Err(SignedRequestError::Stale { age_secs: 3601, .. })
        ));
        assert!(matches!(
            parse_deletion_callback(&at(now + 301), &s, now, 3600),
            Err(SignedRequestError::Stale { .. })
        ));
        let login = sign_request(
            "s",
            &json!({"algorithm": "HMAC-SHA256", "code": "AQ", "issued_at": now, "user_id": "1"}),
        );
        assert_eq!(
            parse_deletion_callback(&login, &s, now, 3600),
            Err(SignedRequestError::NotADeletionCallback { field: "code" })
        );
        let token = sign_request(
            "s",
            &json!({"algorithm": "HMAC-SHA256", "oauth_token": "EA", "issued_at": now,
                    "user_id": "1"}),
        );
        assert_eq!(
            parse_deletion_callback(&token, &s, now, 3600),
            Err(SignedRequestError::NotADeletionCallback {
                field: "oauth_token"
            })
        );
        let undated = sign_request("s", &json!({"algorithm": "HMAC-SHA256", "user_id": "1"}));
        assert!(matches!(
            parse_deletion_callback(&undated, &s, now, 3600),
            Err(SignedRequestError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_requests() {
        let s = secrets(&["s"]);
        for bad in ["", "abc", ".abc", "abc.", "!!!.abc", "YWJj.YWJj"] {
            assert!(
                matches!(
                    parse_signed_request(bad, &s),
                    Err(SignedRequestError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        // Authentic but with a wrong algorithm or without a user id.
        for p in [
            json!({"algorithm": "HMAC-SHA1", "user_id": "1"}),
            json!({"algorithm": "HMAC-SHA256"}),
            json!({"algorithm": "HMAC-SHA256", "user_id": "1_2"}),
        ] {
            let req = sign_request("s", &p);
            assert!(
                matches!(
                    parse_signed_request(&req, &s),
                    Err(SignedRequestError::Malformed(_))
                ),
                "{p}"
            );
        }
        let not_json = {
            let payload = URL_SAFE_NO_PAD.encode("not json");
            let sig = crate::signature::hmac_sha256(b"s", payload.as_bytes());
            format!("{}.{payload}", URL_SAFE_NO_PAD.encode(sig))
        };
        assert!(matches!(
            parse_signed_request(&not_json, &s),
            Err(SignedRequestError::Malformed(_))
        ));
    }
}
