//! The signature of `POST /login-events`, sent by the business's own backend.
//!
//! Scheme (Stripe-style, so the timestamp is covered by the MAC and a captured request cannot
//! be replayed later):
//!
//! ```text
//! X-LoginConnect-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">
//! ```
//!
//! The key is a shared secret configured on both sides (`LOGIN_EVENTS_SECRETS`), separate
//! from Meta's app secret. Several `v1=` entries may be sent (one per secret while rotating,
//! at most [`MAX_SIGNATURES`] in a header of at most [`MAX_HEADER_LEN`] bytes); any configured
//! secret matching any entry is accepted. The MAC is computed once per secret and compared
//! with each entry in constant time, so a request costs at most one MAC per secret whatever it
//! sends. The request is refused when `t` is
//! further than the allowed skew from the receiver's clock, in either direction. Inside that
//! window a replay is possible but harmless: the same login produces the same opt-in key.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::secret::Secret;
use crate::signature::hmac_sha256;

/// The header carrying the signature.
pub const LOGIN_SIGNATURE_HEADER: &str = "x-loginconnect-signature";
/// Longest header accepted: `t` and four `v1` entries take about 300 bytes.
pub const MAX_HEADER_LEN: usize = 1024;
/// Most `v1=` entries accepted in one header (rotation needs two).
pub const MAX_SIGNATURES: usize = 4;

/// Why a signature was refused. Texts are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventSignatureError {
    /// No `X-LoginConnect-Signature` header.
    #[error("missing X-LoginConnect-Signature header")]
    Missing,
    /// The header is not `t=<unix seconds>,v1=<64 hex>`.
    #[error("malformed X-LoginConnect-Signature header: {0}")]
    Malformed(&'static str),
    /// Authentic, but signed too long ago (or too far in the future): a possible replay.
    #[error("signature timestamp is {skew_secs} s away from now; at most {max_secs} s allowed")]
    Stale {
        /// Now minus the signed timestamp, in seconds.
        skew_secs: i64,
        /// The allowed skew.
        max_secs: u64,
    },
    /// No configured secret produces any of the signatures for this body and timestamp.
    #[error("signature does not match the body for any configured login-events secret")]
    Mismatch,
}

impl EventSignatureError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed(_) => "malformed",
            Self::Stale { .. } => "stale",
            Self::Mismatch => "mismatch",
        }
    }
}

/// Computes the header value for `body` signed at `timestamp` (unix seconds); what the
/// business's backend does, and what tests use.
pub fn sign_login_event(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(hmac_sha256(secret.as_bytes(), &message))
    )
}

/// Checks `X-LoginConnect-Signature` headers against the configured secrets.
#[derive(Clone)]
pub struct EventSignatureVerifier {
    keys: Vec<Hmac<Sha256>>,
    max_skew: Duration,
}

impl std::fmt::Debug for EventSignatureVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSignatureVerifier")
            .field("secrets", &self.keys.len())
            .field("max_skew", &self.max_skew)
            .finish()
    }
}

impl EventSignatureVerifier {
    /// A verifier for `secrets` (any one may sign) allowing `max_skew` between clocks.
    pub fn new(secrets: &[Secret], max_skew: Duration) -> Self {
        let keys = secrets
            .iter()
            // HMAC accepts keys of any length, so no secret is ever dropped here.
            .filter_map(|s| Hmac::<Sha256>::new_from_slice(s.expose().as_bytes()).ok())
            .collect();
        Self { keys, max_skew }
    }

    /// Verifies `header` for `body` at `now` (unix seconds) and returns the signed timestamp.
    ///
    /// The MAC is checked before the timestamp, so an unauthenticated request is always a
    /// mismatch, never "stale".
    pub fn verify(
        &self,
        header: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<i64, EventSignatureError> {
        let header = header.ok_or(EventSignatureError::Missing)?;
        if header.len() > MAX_HEADER_LEN {
            return Err(EventSignatureError::Malformed(
                "the header is longer than 1024 bytes",
            ));
        }
        let (t_text, signatures) = parse_header(header)?;
        let t: i64 = t_text
            .parse()
            .map_err(|_| EventSignatureError::Malformed("t must be unix seconds"))?;
        let mut matched = subtle::Choice::from(0);
        // One MAC per secret, compared with every entry in constant time; every key and every
        // entry is tried, so timing does not tell which matched.
        for key in &self.keys {
            let mut mac = key.clone();
            mac.update(t_text.as_bytes());
            mac.update(b".");
            mac.update(body);
            let tag = mac.finalize().into_bytes();
            for expected in &signatures {
                matched |= tag.as_slice().ct_eq(expected);
            }
        }
        let matched: bool = matched.into();
        if !matched {
            return Err(EventSignatureError::Mismatch);
        }
        let skew = now.saturating_sub(t);
        let max = i64::try_from(self.max_skew.as_secs()).unwrap_or(i64::MAX);
        if skew.unsigned_abs() > max.unsigned_abs() {
            return Err(EventSignatureError::Stale {
                skew_secs: skew,
                max_secs: self.max_skew.as_secs(),
            });
        }
        Ok(t)
    }
}

/// Splits `t=…,v1=…[,v1=…]`; unknown keys are ignored so the scheme can grow (e.g. a `v2`).
fn parse_header(header: &str) -> Result<(&str, Vec<Vec<u8>>), EventSignatureError> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(EventSignatureError::Malformed("expected key=value pairs"))?;
        match key.trim() {
            "t" if t.is_some() => return Err(EventSignatureError::Malformed("t given twice")),
            "t" => {
                let value = value.trim();
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(EventSignatureError::Malformed("t must be unix seconds"));
                }
                t = Some(value);
            }
            "v1" => {
                let value = value.trim();
                if value.len() != 64 {
                    return Err(EventSignatureError::Malformed(
                        "v1 must be 64 hex characters",
                    ));
                }
                if signatures.len() == MAX_SIGNATURES {
                    return Err(EventSignatureError::Malformed(
                        "at most 4 v1 signatures are accepted",
                    ));
                }
                let bytes = hex::decode(value)
                    .map_err(|_| EventSignatureError::Malformed("v1 must be 64 hex characters"))?;
                signatures.push(bytes);
            }
            _ => {}
        }
    }
    let t = t.ok_or(EventSignatureError::Malformed("no t= timestamp"))?;
    if signatures.is_empty() {
        return Err(EventSignatureError::Malformed("no v1= signature"));
    }
    Ok((t, signatures))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(secrets: &[&str]) -> EventSignatureVerifier {
        let s: Vec<Secret> = secrets.iter().map(|s| Secret::new(*s)).collect();
        EventSignatureVerifier::new(&s, Duration::from_secs(300))
    }

    const NOW: i64 = 1_700_000_000;

    #[test]
    fn accepts_any_configured_secret_within_the_skew() {
        let v = verifier(&["old", "new"]);
        let body = br#"{"asid":"1"}"#;
        for secret in ["old", "new"] {
            let h = sign_login_event(secret, NOW - 299, body);
            assert_eq!(v.verify(Some(&h), body, NOW), Ok(NOW - 299));
        }
        let h = sign_login_event("new", NOW + 299, body);
        assert!(
            v.verify(Some(&h), body, NOW).is_ok(),
            "small future skew is fine"
        );
    }

    #[test]
    fn refuses_stale_and_future_timestamps() {
        let v = verifier(&["s"]);
        let body = b"{}";
        let old = sign_login_event("s", NOW - 301, body);
        assert!(matches!(
            v.verify(Some(&old), body, NOW),
            Err(EventSignatureError::Stale { skew_secs: 301, .. })
        ));
        let future = sign_login_event("s", NOW + 301, body);
        assert!(matches!(
            v.verify(Some(&future), body, NOW),
            Err(EventSignatureError::Stale { .. })
        ));
    }

    #[test]
    fn the_timestamp_is_covered_by_the_mac() {
        let v = verifier(&["s"]);
        let body = b"{}";
        let signed = sign_login_event("s", NOW - 1000, body);
        // Moving an old signature to a fresh timestamp must not work.
        let moved = signed.replace(&format!("t={}", NOW - 1000), &format!("t={NOW}"));
        assert_eq!(
            v.verify(Some(&moved), body, NOW),
            Err(EventSignatureError::Mismatch)
        );
        assert_eq!(
            v.verify(Some(&sign_login_event("s", NOW, body)), b"{ }", NOW),
            Err(EventSignatureError::Mismatch)
        );
        assert_eq!(
            v.verify(Some(&sign_login_event("other", NOW, body)), body, NOW),
            Err(EventSignatureError::Mismatch)
        );
    }

    #[test]
    fn several_signatures_while_rotating() {
        let v = verifier(&["new"]);
        let body = b"{}";
        let a = sign_login_event("old", NOW, body);
        let b = sign_login_event("new", NOW, body);
        let (_, b_sig) = b.split_once(",v1=").expect("v1");
        let both = format!("{a},v1={b_sig},v0=ignored");
        assert_eq!(v.verify(Some(&both), body, NOW), Ok(NOW));
    }

    #[test]
    fn headers_are_bounded() {
        let v = verifier(&["s"]);
        let body = b"{}";
        let valid = sign_login_event("s", NOW, body);
        let other = format!(",v1={}", "0".repeat(64));
        let four = format!("{valid}{}", other.repeat(3));
        assert_eq!(v.verify(Some(&four), body, NOW), Ok(NOW));
        let five = format!("{valid}{}", other.repeat(4));
        assert_eq!(
            v.verify(Some(&five), body, NOW),
            Err(EventSignatureError::Malformed(
                "at most 4 v1 signatures are accepted"
            ))
        );
        let long = format!("{valid},x={}", "a".repeat(MAX_HEADER_LEN));
        assert!(matches!(
            v.verify(Some(&long), body, NOW),
            Err(EventSignatureError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_headers() {
        let v = verifier(&["s"]);
        assert_eq!(v.verify(None, b"", NOW), Err(EventSignatureError::Missing));
        for bad in [
            "",
            "garbage",
            "t=abc,v1=00",
            &format!("v1={}", "0".repeat(64)),
            &format!("t={NOW}"),
            &format!("t={NOW},v1={}", "z".repeat(64)),
            &format!("t={NOW},t={NOW},v1={}", "0".repeat(64)),
            &format!("t=-5,v1={}", "0".repeat(64)),
        ] {
            assert!(
                matches!(
                    v.verify(Some(bad), b"", NOW),
                    Err(EventSignatureError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }
}
