//! Bearer tokens of the admin API: `ADMIN_TOKENS=name:scope:token,...` (or a file of the same
//! items, one per line), scopes `read` and `write` (`write` includes `read`).
//!
//! A presented token is hashed and compared with the hash of every configured token in
//! constant time (`subtle`), always against all of them, so neither the timing nor the order
//! tells anything about a token. Only a token's *name* is ever logged or echoed.

use std::fmt;

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest token accepted: a guessable token would make the API an open door.
pub const MIN_TOKEN_LEN: usize = 24;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Read pages, apps, statuses, opt-ins and links.
    Read,
    /// Everything `read` may, and change the registry (create, update, tokens, pause, delete).
    Write,
}

impl Scope {
    /// `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Read, Self::Write]
            .into_iter()
            .find(|x| x.as_str() == s)
    }

    /// Whether a token with this scope may do what `needed` asks.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

/// Why the token list cannot be used (names the item, never a token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenListError {
    /// An item is not `name:scope:token`.
    #[error(
        "ADMIN_TOKENS item {0} is not `name:scope:token` (scope `read` or `write`, a name of \
         letters, digits, `-`, `_`, `.`)"
    )]
    Malformed(usize),
    /// A token is too short.
    #[error(
        "ADMIN_TOKENS item {0}: the token is shorter than {MIN_TOKEN_LEN} characters; generate \
         one with `openssl rand -base64 32`"
    )]
    Weak(usize),
    /// Two items share a name.
    #[error("ADMIN_TOKENS names {0:?} twice; give every token its own name")]
    DuplicateName(String),
    /// No token at all: the API would refuse everything.
    #[error(
        "no admin token configured: set ADMIN_TOKENS (`name:scope:token,...`) or \
         ADMIN_TOKENS_FILE"
    )]
    Empty,
}

struct Entry {
    name: String,
    scope: Scope,
    digest: [u8; 32],
    /// Signs this token's console sessions (see [`AdminTokens::session_key`]).
    session_key: [u8; 32],
}

/// Context of the console session key: a key for nothing else, derived from the token.
const SESSION_KEY_CONTEXT: &[u8] = b"loginconnect admin console session v1";

/// HMAC-SHA256 of `msg` under a 32-byte `key`.
pub(crate) fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    // A key shorter than SHA-256's 64-byte block is zero-padded by HMAC itself (RFC 2104),
    // so padding it here gives the same MAC through the constructor that cannot fail.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new(&block.into());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// The token's console session key: a key for nothing else, derived from the token.
fn session_key_of(token: &str) -> [u8; 32] {
    hmac_sha256(
        &Sha256::digest(token.as_bytes()).into(),
        SESSION_KEY_CONTEXT,
    )
}

/// The configured tokens.
pub struct AdminTokens {
    entries: Vec<Entry>,
}

impl fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<(&str, &str)> = self
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.scope.as_str()))
            .collect();
        f.debug_struct("AdminTokens")
            .field("tokens", &names)
            .finish()
    }
}

/// Who called: the token's name and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (what logs show).
    pub name: String,
    /// Its scope.
    pub scope: Scope,
}

impl AdminTokens {
    /// Parses items separated by commas or newlines; blank items and `#` lines are skipped.
    pub fn parse(list: &str) -> Result<Self, TokenListError> {
        let mut entries: Vec<Entry> = Vec::new();
        let items = list
            .split([',', '\n'])
            .map(str::trim)
            .filter(|i| !i.is_empty() && !i.starts_with('#'));
        for (i, item) in items.enumerate() {
            let position = i + 1;
            let mut parts = item.splitn(3, ':');
            let (Some(name), Some(scope), Some(token)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(TokenListError::Malformed(position));
            };
            let (name, token) = (name.trim(), token.trim());
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            let scope = Scope::parse(scope.trim()).ok_or(TokenListError::Malformed(position))?;
            if !name_ok {
                return Err(TokenListError::Malformed(position));
            }
            if token.chars().count() < MIN_TOKEN_LEN {
                return Err(TokenListError::Weak(position));
            }
            if entries.iter().any(|e| e.name == name) {
                return Err(TokenListError::DuplicateName(name.to_owned()));
            }
            entries.push(Entry {
                name: name.to_owned(),
                scope,
                digest: Sha256::digest(token.as_bytes()).into(),
                session_key: session_key_of(token),
            });
        }
        if entries.is_empty() {
            return Err(TokenListError::Empty);
        }
        Ok(Self { entries })
    }

    /// The caller a presented token belongs to, if any (constant time over every token).
    pub fn identify(&self, presented: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            // No early exit: every token is compared, whatever matched before.
            if bool::from(e.digest.ct_eq(&digest)) {
                found = Some(e);
            }
        }
        found.map(|e| Caller {
            name: e.name.clone(),
            scope: e.scope,
        })
    }
}

impl AdminTokens {
    /// The caller named `name` and the key that signs its console sessions.
    ///
    /// The key is derived from the token itself, so every admin replica configured with the
    /// same `ADMIN_TOKENS` derives the same key (no shared session store, no extra secret),
    /// and removing or rotating a token ends every session made with it.
    pub(crate) fn session_key(&self, name: &str) -> Option<(Caller, [u8; 32])> {
        self.entries.iter().find(|e| e.name == name).map(|e| {
            (
                Caller {
                    name: e.name.clone(),
                    scope: e.scope,
                },
                e.session_key,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "reader-token-0123456789abcdef";
    const W: &str = "writer-token-0123456789abcdef";

    #[test]
    fn tokens_identify_their_name_and_scope() {
        let t = AdminTokens::parse(&format!("crm:read:{R}, ops:write:{W}")).expect("tokens");
        assert_eq!(t.identify(R).expect("r").name, "crm");
        assert_eq!(t.identify(W).expect("w").scope, Scope::Write);
        assert!(t.identify("nope").is_none());
        assert!(Scope::Write.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Write));
        assert!(!format!("{t:?}").contains("reader-token"));
    }

    #[test]
    fn bad_lists_are_refused_without_echoing_tokens() {
        for (list, want) in [
            ("crm:read", TokenListError::Malformed(1)),
            (&*format!("crm:admin:{R}"), TokenListError::Malformed(1)),
            ("crm:read:short", TokenListError::Weak(1)),
            (
                &*format!("a:read:{R},a:write:{W}"),
                TokenListError::DuplicateName("a".into()),
            ),
            ("", TokenListError::Empty),
        ] {
            let e = AdminTokens::parse(list).expect_err(list);
            assert_eq!(e, want);
            assert!(!e.to_string().contains("token-0123"), "{e}");
        }
    }
}
