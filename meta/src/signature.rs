//! Verification of Meta's webhook signatures over the raw request bytes.
//!
//! Meta signs the body exactly as sent (escaped-unicode JSON), so verification must run on the
//! bytes received, before any parsing. Each configured app secret is tried, which covers secret
//! rotation and deployments that receive webhooks for two apps.

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::Sha256;

use crate::secret::Secret;

/// Header carrying the SHA-256 signature: `sha256=<64 lowercase hex>`.
pub const SIGNATURE_256_HEADER: &str = "x-hub-signature-256";
/// Legacy header carrying a SHA-1 signature: `sha1=<40 hex>`.
pub const SIGNATURE_SHA1_HEADER: &str = "x-hub-signature";

/// Why a delivery's signature was refused. The texts are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Neither accepted header was present.
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    /// The header does not start with the expected algorithm prefix.
    #[error("signature header must start with '{expected}'")]
    WrongPrefix {
        /// The prefix that was expected, e.g. `sha256=`.
        expected: &'static str,
    },
    /// The part after the prefix is not hex of the right length.
    #[error("signature is not {expected_len} hex characters")]
    Malformed {
        /// Expected number of hex characters.
        expected_len: usize,
    },
    /// Well-formed, but no configured secret produces it for this body.
    #[error("signature does not match the body for any configured app secret")]
    Mismatch,
}

/// Checks webhook signatures against a set of app secrets.
///
/// Keyed MACs are built once and cloned per request, which is cheaper than re-keying.
#[derive(Clone)]
pub struct SignatureVerifier {
    sha256: Vec<Hmac<Sha256>>,
    sha1: Vec<Hmac<Sha1>>,
    accept_sha1: bool,
}

impl std::fmt::Debug for SignatureVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureVerifier")
            .field("secrets", &self.sha256.len())
            .field("accept_sha1", &self.accept_sha1)
            .finish()
    }
}

impl SignatureVerifier {
    /// A verifier for the given app secrets. `accept_sha1` also allows the legacy
    /// `X-Hub-Signature: sha1=…` header when the SHA-256 one is absent.
    pub fn new(secrets: &[Secret], accept_sha1: bool) -> Self {
        let sha256 = secrets
            .iter()
            .map(|s| keyed::<Hmac<Sha256>>(s.expose().as_bytes()))
            .collect();
        let sha1 = secrets
            .iter()
            .map(|s| keyed::<Hmac<Sha1>>(s.expose().as_bytes()))
            .collect();
        Self {
            sha256,
            sha1,
            accept_sha1,
        }
    }

    /// Verifies `body` against the header values found on the request.
    ///
    /// The SHA-256 header wins when present; SHA-1 is consulted only when enabled and the
    /// SHA-256 header is absent, so a downgrade cannot bypass a wrong SHA-256 signature.
    pub fn verify(
        &self,
        sha256_header: Option<&str>,
        sha1_header: Option<&str>,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        self.matching(sha256_header, sha1_header, body).map(|_| ())
    }

    /// Like [`Self::verify`], but says which secrets produce the signature: their positions
    /// in the list given to [`Self::new`] (never empty on success; several when the same
    /// secret was given twice). Ingest needs this to tell which app signed a delivery.
    pub fn matching(
        &self,
        sha256_header: Option<&str>,
        sha1_header: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<usize>, SignatureError> {
        match (sha256_header, sha1_header) {
            (Some(h), _) => verify_with(&self.sha256, h, "sha256=", 64, body),
            (None, Some(h)) if self.accept_sha1 => verify_with(&self.sha1, h, "sha1=", 40, body),
            _ => Err(SignatureError::Missing),
        }
    }
}

fn verify_with<M: Mac + Clone>(
    keys: &[M],
    header: &str,
    prefix: &'static str,
    hex_len: usize,
    body: &[u8],
) -> Result<Vec<usize>, SignatureError> {
    let header = header.trim();
    let hex_part = header
        .strip_prefix(prefix)
        .ok_or(SignatureError::WrongPrefix { expected: prefix })?;
    if hex_part.len() != hex_len {
        return Err(SignatureError::Malformed {
            expected_len: hex_len,
        });
    }
    let expected = hex::decode(hex_part).map_err(|_| SignatureError::Malformed {
        expected_len: hex_len,
    })?;
    // Every key is tried even after a match would be found, so timing does not reveal which
    // secret (or whether any) matched early.
    let mut matched = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let mut mac = key.clone();
        mac.update(body);
        if mac.verify_slice(&expected).is_ok() {
            matched.push(i);
        }
    }
    if matched.is_empty() {
        Err(SignatureError::Mismatch)
    } else {
        Ok(matched)
    }
}

/// Computes the `X-Hub-Signature-256` header value for `body` (used by tests, the demo and
/// the benchmark to sign like Meta does).
pub fn sign_sha256(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.as_bytes(), body))
    )
}

/// Computes a legacy `X-Hub-Signature` header value.
pub fn sign_sha1(secret: &str, body: &[u8]) -> String {
    let mut mac: Hmac<Sha1> = keyed(secret.as_bytes());
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A keyed HMAC. HMAC takes keys of any length (long ones are hashed), so keying cannot fail.
#[allow(
    clippy::expect_used,
    reason = "new_from_slice only fails for fixed-size keys, which HMAC has not"
)]
fn keyed<M: KeyInit>(key: &[u8]) -> M {
    M::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// HMAC-SHA256 of `msg` keyed by `key` (HMAC accepts keys of any length).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut mac: Hmac<Sha256> = keyed(key);
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// Constant-time equality of two byte strings (for tokens that are not MACs).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Comparing MACs of both values with a per-process key keeps the comparison constant
    // time whatever the inputs' lengths, without a hand-written timing-safe loop.
    let key = b"loginconnect-constant-time-compare";
    let ha = hmac_sha256(key, a);
    let mut mac: Hmac<Sha256> = keyed(key);
    mac.update(b);
    mac.verify_slice(&ha).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(secrets: &[&str], sha1: bool) -> SignatureVerifier {
        let s: Vec<Secret> = secrets.iter().map(|s| Secret::new(*s)).collect();
        SignatureVerifier::new(&s, sha1)
    }

    #[test]
    fn accepts_any_configured_secret() {
        let v = verifier(&["old", "new"], false);
        let body = br#"{"object":"page"}"#;
        assert_eq!(
            v.verify(Some(&sign_sha256("new", body)), None, body),
            Ok(())
        );
        assert_eq!(
            v.verify(Some(&sign_sha256("old", body)), None, body),
            Ok(())
        );
        assert_eq!(
            v.verify(Some(&sign_sha256("other", body)), None, body),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn matching_names_the_secrets_that_sign() {
        let v = verifier(&["a", "b", "a"], false);
        let body = br#"{"object":"page"}"#;
        assert_eq!(
            v.matching(Some(&sign_sha256("a", body)), None, body),
            Ok(vec![0, 2])
        );
        assert_eq!(
            v.matching(Some(&sign_sha256("b", body)), None, body),
            Ok(vec![1])
        );
        assert_eq!(
            v.matching(Some(&sign_sha256("c", body)), None, body),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn rejects_malformed_headers() {
        let v = verifier(&["s"], false);
        let body = b"{}";
        let good = sign_sha256("s", body);
        assert_eq!(v.verify(None, None, body), Err(SignatureError::Missing));
        assert!(matches!(
            v.verify(Some(&good.replace("sha256=", "sha1=")), None, body),
            Err(SignatureError::WrongPrefix { .. })
        ));
        assert!(matches!(
            v.verify(Some(&good[..good.len() - 2]), None, body),
            Err(SignatureError::Malformed { .. })
        ));
        let non_hex = format!("sha256={}", "z".repeat(64));
        assert!(matches!(
            v.verify(Some(&non_hex), None, body),
            Err(SignatureError::Malformed { .. })
        ));
    }

    #[test]
    fn every_single_byte_change_is_rejected() {
        let v = verifier(&["s"], false);
        let body = b"{\"object\":\"page\",\"entry\":[]}";
        let good = sign_sha256("s", body);
        for i in "sha256=".len()..good.len() {
            let mut bytes = good.clone().into_bytes();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(bytes).expect("ascii");
            assert!(v.verify(Some(&changed), None, body).is_err(), "byte {i}");
        }
        let mut other_body = body.to_vec();
        for i in 0..other_body.len() {
            other_body[i] ^= 1;
            assert!(
                v.verify(Some(&good), None, &other_body).is_err(),
                "body byte {i}"
            );
            other_body[i] ^= 1;
        }
    }

    #[test]
    fn sha1_only_when_enabled_and_sha256_absent() {
        let body = b"{}";
        let sha1 = sign_sha1("s", body);
        assert_eq!(
            verifier(&["s"], false).verify(None, Some(&sha1), body),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verifier(&["s"], true).verify(None, Some(&sha1), body),
            Ok(())
        );
        let wrong256 = sign_sha256("x", body);
        assert_eq!(
            verifier(&["s"], true).verify(Some(&wrong256), Some(&sha1), body),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn constant_time_eq_compares_values() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokem"));
        assert!(!constant_time_eq(b"token", b"token2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
