//! Who is using the console: a signed session cookie (set by the login form) or an
//! `Authorization: Bearer` header, and the CSRF token of the write forms.
//!
//! The cookie holds `name:expires:mac`, never the token: `mac` is an HMAC of the name and
//! expiry under a key derived from that token ([`AdminTokens::session_key`]). That is a
//! signed session rather than a server-side one on purpose: every admin replica configured
//! with the same `ADMIN_TOKENS` verifies it without a shared store or another secret, a
//! stolen cookie expires (unlike the token itself) and cannot be turned back into the token,
//! and rotating or removing a token ends its sessions. The scope is read from the current
//! token list on every request, so lowering a token's scope takes effect at once.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::ConsoleError;
use crate::admin::AdminState;
use crate::admin::auth::{AdminTokens, Caller, Scope, hmac_sha256};

/// The session cookie's name.
pub const COOKIE: &str = "lc_console";
/// How long a session lasts; log in again afterwards.
pub const SESSION_SECONDS: i64 = 8 * 3600;

/// The person using the console, as far as a request tells.
#[derive(Debug, Clone)]
pub struct ConsoleUser {
    /// The token's name and scope.
    pub caller: Caller,
    /// The CSRF token the write forms carry; `None` when authenticated by a bearer header,
    /// which a browser never adds to a cross-site request by itself.
    pub csrf: Option<String>,
    /// Whether this user may see and use write actions (write scope, console not read-only).
    pub can_write: bool,
    /// Whether the console runs read-only (`ADMIN_CONSOLE_READ_ONLY`).
    pub read_only: bool,
}

/// The MAC of a session of `name` until `expires`.
fn session_mac(key: &[u8; 32], name: &str, expires: i64) -> String {
    hex::encode(hmac_sha256(
        key,
        format!("session|{name}|{expires}").as_bytes(),
    ))
}

/// The cookie value of a new session for `presented`, if it is a configured token.
pub fn open(
    tokens: &AdminTokens,
    presented: &str,
    now: OffsetDateTime,
) -> Option<(Caller, String)> {
    let caller = tokens.identify(presented)?;
    let (_, key) = tokens.session_key(&caller.name)?;
    let expires = now.unix_timestamp() + SESSION_SECONDS;
    let value = format!(
        "{}:{expires}:{}",
        caller.name,
        session_mac(&key, &caller.name, expires)
    );
    Some((caller, value))
}

/// Why a session cookie is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a cookie this console made, or made with a token no longer configured.
    Invalid,
    /// Older than [`SESSION_SECONDS`].
    Expired,
}

/// The caller of a session cookie and its session key.
pub fn verify(
    tokens: &AdminTokens,
    value: &str,
    now: OffsetDateTime,
) -> Result<(Caller, [u8; 32]), Refusal> {
    let mut parts = value.splitn(3, ':');
    let (Some(name), Some(expires), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Refusal::Invalid);
    };
    let expires: i64 = expires.parse().map_err(|_| Refusal::Invalid)?;
    let (caller, key) = tokens.session_key(name).ok_or(Refusal::Invalid)?;
    let expected = session_mac(&key, name, expires);
    if !bool::from(expected.as_bytes().ct_eq(mac.as_bytes())) {
        return Err(Refusal::Invalid);
    }
    if expires <= now.unix_timestamp() {
        return Err(Refusal::Expired);
    }
    Ok((caller, key))
}

/// The CSRF token of the session whose cookie is `value`: bound to that cookie, so a page
/// of another site can neither read nor guess it.
pub fn csrf_of(key: &[u8; 32], value: &str) -> String {
    hex::encode(hmac_sha256(key, format!("csrf|{value}").as_bytes()))
}

/// The `Set-Cookie` value of a session (`Secure` when the console is served over HTTPS).
pub fn set_cookie(value: &str, https: bool) -> String {
    let secure = if https { "; Secure" } else { "" };
    format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}{secure}"
    )
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn clear_cookie(https: bool) -> String {
    let secure = if https { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// The value of the session cookie, if the request has one.
fn cookie_value(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// The token of an `Authorization: Bearer` header, if any.
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

impl ConsoleUser {
    /// Whether this user may see write forms: write scope and the console not read-only.
    pub fn may_write(&self) -> Result<(), ConsoleError> {
        if self.read_only {
            return Err(ConsoleError::ReadOnly);
        }
        if !self.caller.scope.allows(Scope::Write) {
            return Err(ConsoleError::Scope(self.caller.name.clone()));
        }
        Ok(())
    }

    fn new(caller: Caller, csrf: Option<String>, read_only: bool) -> Self {
        let can_write = caller.scope.allows(Scope::Write) && !read_only;
        Self {
            caller,
            csrf,
            can_write,
            read_only,
        }
    }

    /// Whether this user may do a write the form carrying `presented` asks for: write
    /// scope, the console not read-only, and the session's CSRF token (cookie sessions).
    pub fn check_write(&self, presented: &str) -> Result<(), ConsoleError> {
        self.may_write()?;
        if let Some(expected) = &self.csrf
            && !bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
        {
            return Err(ConsoleError::Csrf);
        }
        Ok(())
    }
}

impl FromRequestParts<AdminState> for ConsoleUser {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        let read_only = state.console.read_only;
        if let Some(token) = bearer(parts) {
            let caller = state
                .tokens
                .identify(token)
                .ok_or(ConsoleError::BadBearer)?;
            return Ok(Self::new(caller, None, read_only));
        }
        let Some(value) = cookie_value(parts) else {
            return Err(ConsoleError::LoginNeeded(None));
        };
        match verify(&state.tokens, value, OffsetDateTime::now_utc()) {
            Ok((caller, key)) => {
                let csrf = csrf_of(&key, value);
                Ok(Self::new(caller, Some(csrf), read_only))
            }
            Err(refusal) => Err(ConsoleError::LoginNeeded(Some(refusal))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "reader-token-0123456789abcdef";
    const W: &str = "writer-token-0123456789abcdef";

    fn tokens() -> AdminTokens {
        AdminTokens::parse(&format!("crm:read:{R},ops:write:{W}")).expect("tokens")
    }

    #[test]
    fn a_session_names_its_token_and_never_holds_it() {
        let now = OffsetDateTime::now_utc();
        let (caller, value) = open(&tokens(), W, now).expect("a session");
        assert_eq!(caller.name, "ops");
        assert!(!value.contains(W), "{value}");
        let (again, _) = verify(&tokens(), &value, now).expect("valid");
        assert_eq!(again.scope, Scope::Write);
        assert!(open(&tokens(), "not-a-token-at-all-0123456789", now).is_none());
    }

    #[test]
    fn forged_expired_and_foreign_sessions_are_refused() {
        let now = OffsetDateTime::now_utc();
        let (_, value) = open(&tokens(), R, now).expect("a session");
        // Claiming the write token's name with the read session's MAC.
        let forged = value.replacen("crm", "ops", 1);
        assert_eq!(
            verify(&tokens(), &forged, now).err(),
            Some(Refusal::Invalid)
        );
        let later = now + time::Duration::seconds(SESSION_SECONDS + 1);
        assert_eq!(
            verify(&tokens(), &value, later).err(),
            Some(Refusal::Expired)
        );
        // Another deployment's tokens (same names, other values) do not accept it.
        let other = AdminTokens::parse(&format!("crm:read:{W},ops:write:{R}")).expect("tokens");
        assert_eq!(verify(&other, &value, now).err(), Some(Refusal::Invalid));
        assert_eq!(
            verify(&tokens(), "garbage", now).err(),
            Some(Refusal::Invalid)
        );
    }

    #[test]
    fn writes_need_scope_csrf_and_a_writable_console() {
        let caller = |scope| Caller {
            name: "x".into(),
            scope,
        };
        let writer = ConsoleUser::new(caller(Scope::Write), Some("abc".into()), false);
        assert!(writer.check_write("abc").is_ok());
        assert!(matches!(writer.check_write("abd"), Err(ConsoleError::Csrf)));
        let reader = ConsoleUser::new(caller(Scope::Read), Some("abc".into()), false);
        assert!(!reader.can_write);
        assert!(matches!(
            reader.check_write("abc"),
            Err(ConsoleError::Scope(_))
        ));
        let frozen = ConsoleUser::new(caller(Scope::Write), Some("abc".into()), true);
        assert!(!frozen.can_write);
        assert!(matches!(
            frozen.check_write("abc"),
            Err(ConsoleError::ReadOnly)
        ));
        let bearer = ConsoleUser::new(caller(Scope::Write), None, false);
        assert!(bearer.check_write("").is_ok());
    }
}
