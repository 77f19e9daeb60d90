//! Computing a `login_id` without waiting for the webhook.
//!
//! Meta's FAQ says the `login_id` exists as soon as Facebook Login succeeds, and Meta's
//! official sample (`loginconnect_directintegrator/app.js`, `generateLoginID`) computes it as
//! `hex(HMAC-SHA256(key = client token, message = "umc_{asid}_{app_id}_{page_id}"))`, where
//! `asid` is the person's app-scoped user id, `app_id` the Login app and `page_id` the Page the
//! person opted in to. Meta's reference documentation does not describe the formula; compare
//! a computed value with a webhook's `optin.login_id` before relying on it in production.

use std::fmt;
use std::str::FromStr;

use crate::secret::Secret;
use crate::signature::hmac_sha256;

/// Longest id accepted; Facebook ids are 15–17 digits today.
const MAX_ID_DIGITS: usize = 32;

/// `hex(HMAC-SHA256(client_token, "umc_{asid}_{app_id}_{page_id}"))`: 64 lowercase hex digits.
///
/// Callers must pass ids that satisfy [`is_facebook_id`]: with `_` allowed inside an id, two
/// different triples could produce the same message.
pub fn compute_login_id(client_token: &Secret, asid: &str, app_id: &str, page_id: &str) -> String {
    let message = format!("umc_{asid}_{app_id}_{page_id}");
    hex::encode(hmac_sha256(
        client_token.expose().as_bytes(),
        message.as_bytes(),
    ))
}

/// True for a Facebook object id: 1 to 32 ASCII digits.
pub fn is_facebook_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_DIGITS && id.bytes().all(|b| b.is_ascii_digit())
}

/// One Login app and its client token, written `app_id=token` in configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct AppClientToken {
    /// The Login app's id (digits).
    pub app_id: String,
    /// The app's client token (App Dashboard → Settings → Advanced → Client token).
    pub token: Secret,
}

impl fmt::Debug for AppClientToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppClientToken")
            .field("app_id", &self.app_id)
            .field("token", &self.token)
            .finish()
    }
}

/// Why an `app_id=token` item was refused; the text never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientTokenError {
    /// No `=` in the item.
    #[error("expected app_id=client_token (comma-separated for several apps)")]
    MissingEquals,
    /// The part before `=` is not an app id.
    #[error("the app id before '=' must be digits")]
    BadAppId,
    /// Nothing after `=`.
    #[error("the client token after '=' of app {app_id} is empty")]
    EmptyToken {
        /// The app whose token is empty.
        app_id: String,
    },
}

impl FromStr for AppClientToken {
    type Err = ClientTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (app_id, token) = s.split_once('=').ok_or(ClientTokenError::MissingEquals)?;
        let app_id = app_id.trim();
        if !is_facebook_id(app_id) {
            return Err(ClientTokenError::BadAppId);
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(ClientTokenError::EmptyToken {
                app_id: app_id.to_owned(),
            });
        }
        Ok(Self {
            app_id: app_id.to_owned(),
            token: Secret::new(token),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test vector computed with the Node code of Meta's sample (`fbsamples/fblogin-sample`).
    #[test]
    fn matches_the_sample_test_vector() {
        let token = Secret::new("test_client_token");
        assert_eq!(
            compute_login_id(&token, "1234567890", "111111111111111", "222222222222222"),
            "0bab772ca416ba5a9bfce7cd8442a14fa7c5a1a4c940b68106a3cf4671e5d551"
        );
    }

    #[test]
    fn every_input_changes_the_result() {
        let token = Secret::new("t");
        let base = compute_login_id(&token, "1", "2", "3");
        assert_ne!(base, compute_login_id(&Secret::new("u"), "1", "2", "3"));
        assert_ne!(base, compute_login_id(&token, "9", "2", "3"));
        assert_ne!(base, compute_login_id(&token, "1", "9", "3"));
        assert_ne!(base, compute_login_id(&token, "1", "2", "9"));
        assert_eq!(base.len(), 64);
        assert!(
            base.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn ids_are_digits_only() {
        assert!(is_facebook_id("106283175398765"));
        assert!(!is_facebook_id(""));
        assert!(!is_facebook_id("12_3"));
        assert!(!is_facebook_id("12a"));
        assert!(!is_facebook_id(&"1".repeat(33)));
    }

    #[test]
    fn parses_app_token_pairs_without_leaking_the_token() {
        let t: AppClientToken = " 111 = abc ".parse().expect("valid");
        assert_eq!(t.app_id, "111");
        assert_eq!(t.token.expose(), "abc");
        assert!(!format!("{t:?}").contains("abc"));
        assert_eq!(
            "abc".parse::<AppClientToken>(),
            Err(ClientTokenError::MissingEquals)
        );
        assert_eq!(
            "x1=abc".parse::<AppClientToken>(),
            Err(ClientTokenError::BadAppId)
        );
        let err = "1=".parse::<AppClientToken>().expect_err("empty");
        assert!(matches!(err, ClientTokenError::EmptyToken { .. }));
        // A token containing '=' (base64 padding) keeps everything after the first '='.
        let t: AppClientToken = "1=ab==".parse().expect("valid");
        assert_eq!(t.token.expose(), "ab==");
    }
}
