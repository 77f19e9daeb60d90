//! Page tokens set at run time: AES-256-GCM at rest, keys from the environment.
//!
//! `PAGE_TOKEN_KEYS` holds one or more `id:key` pairs, comma-separated, each key 32 bytes in
//! standard base64. The first key encrypts; every key decrypts, so a key is rotated by putting
//! the new one first, running `loginconnect pages rotate-tokens`, and then removing the old
//! one. The page id is the associated data, so a ciphertext copied onto another page's row
//! does not decrypt. Neither tokens nor keys ever appear in an error text.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use lc_meta::secret::Secret;
use sha2::{Digest, Sha256};

use super::store::pages::StoredToken;

/// Why a key list or a stored token cannot be used. Names the key id or page, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenKeyError {
    /// An item of `PAGE_TOKEN_KEYS` is not `id:base64-of-32-bytes`.
    #[error(
        "PAGE_TOKEN_KEYS item {position} is not `id:key` with a 32-byte key in standard base64 \
         (generate one with `openssl rand -base64 32`)"
    )]
    BadKey {
        /// 1-based position in the list.
        position: usize,
    },
    /// Two keys share an id.
    #[error("PAGE_TOKEN_KEYS names key id {0:?} twice; give every key its own id")]
    DuplicateId(String),
    /// No keys are configured but a token must be encrypted or decrypted.
    #[error("PAGE_TOKEN_KEYS is not set: page tokens stored in the database need it")]
    NoKeys,
    /// A stored token was encrypted with a key that is not configured.
    #[error(
        "the token of page {page_id} was encrypted with key {key_id:?}, which PAGE_TOKEN_KEYS does not hold"
    )]
    UnknownKey {
        /// The page.
        page_id: String,
        /// The key id on the row.
        key_id: String,
    },
    /// A stored token does not decrypt (wrong key, altered row).
    #[error("the token of page {0} does not decrypt with its key (altered row or wrong key)")]
    Corrupt(String),
}

/// The configured keys; the first encrypts.
#[derive(Clone, Default)]
pub struct TokenKeys {
    keys: Vec<(String, Aes256Gcm)>,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("TokenKeys").field("ids", &ids).finish()
    }
}

impl TokenKeys {
    /// Parses `PAGE_TOKEN_KEYS` (empty: no keys).
    pub fn parse(list: &str) -> Result<Self, TokenKeyError> {
        let mut keys: Vec<(String, Aes256Gcm)> = Vec::new();
        for (i, item) in list.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                continue;
            }
            let bad = TokenKeyError::BadKey { position: i + 1 };
            let (id, key) = item.split_once(':').ok_or_else(|| bad.clone())?;
            let (id, key) = (id.trim(), key.trim());
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(key)
                .map_err(|_| bad.clone())?;
            if id.is_empty() || bytes.len() != 32 {
                return Err(bad);
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(TokenKeyError::DuplicateId(id.to_owned()));
            }
            let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| bad)?;
            keys.push((id.to_owned(), cipher));
        }
        Ok(Self { keys })
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Encrypts `token` for `page_id` under the first key.
    pub fn seal(&self, page_id: &str, token: &Secret) -> Result<StoredToken, TokenKeyError> {
        let (key_id, cipher) = self.keys.first().ok_or(TokenKeyError::NoKeys)?;
        // 96 random bits from the OS generator (through uuid v4): unique per message with
        // overwhelming probability at the rate tokens are set.
        let random = *uuid::Uuid::new_v4().as_bytes();
        let nonce_bytes = &random[..12];
        let nonce = Nonce::try_from(nonce_bytes).map_err(|_| TokenKeyError::NoKeys)?;
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: token.expose().as_bytes(),
                    aad: page_id.as_bytes(),
                },
            )
            .map_err(|_| TokenKeyError::Corrupt(page_id.to_owned()))?;
        Ok(StoredToken {
            page_id: page_id.to_owned(),
            key_id: key_id.clone(),
            nonce: nonce_bytes.to_vec(),
            ciphertext,
            fingerprint: fingerprint(token.expose()),
            updated_at: time::OffsetDateTime::now_utc(),
        })
    }

    /// Decrypts a stored token with the key it names.
    pub fn open(&self, stored: &StoredToken) -> Result<Secret, TokenKeyError> {
        let cipher = self
            .keys
            .iter()
            .find(|(id, _)| *id == stored.key_id)
            .map(|(_, c)| c)
            .ok_or_else(|| TokenKeyError::UnknownKey {
                page_id: stored.page_id.clone(),
                key_id: stored.key_id.clone(),
            })?;
        let corrupt = || TokenKeyError::Corrupt(stored.page_id.clone());
        let nonce = Nonce::try_from(stored.nonce.as_slice()).map_err(|_| corrupt())?;
        let plain = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &stored.ciphertext,
                    aad: stored.page_id.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| corrupt())
    }
}

/// A short, one-way fingerprint of a token: tells two tokens apart without revealing either.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2:HxwdHBsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

    #[test]
    fn seals_and_opens_and_binds_the_page() {
        let keys = TokenKeys::parse(K1).expect("keys");
        let token = Secret::new("EAAG-secret-token");
        let stored = keys.seal("111", &token).expect("seal");
        assert_eq!(stored.key_id, "k1");
        assert!(
            !stored
                .ciphertext
                .windows(6)
                .any(|w| w == b"secret".as_slice())
        );
        assert_eq!(keys.open(&stored).expect("open").expose(), token.expose());
        let moved = StoredToken {
            page_id: "222".into(),
            ..stored.clone()
        };
        assert_eq!(
            keys.open(&moved).unwrap_err(),
            TokenKeyError::Corrupt("222".into())
        );
    }

    #[test]
    fn the_first_key_encrypts_and_every_key_decrypts() {
        let old = TokenKeys::parse(K1).expect("old");
        let stored = old.seal("111", &Secret::new("t")).expect("seal");
        let rotated = TokenKeys::parse(&format!("{K2}, {K1}")).expect("rotated");
        assert_eq!(rotated.open(&stored).expect("open").expose(), "t");
        assert_eq!(
            rotated.seal("111", &Secret::new("t")).expect("seal").key_id,
            "k2"
        );
        let only_new = TokenKeys::parse(K2).expect("new");
        assert!(matches!(
            only_new.open(&stored),
            Err(TokenKeyError::UnknownKey { .. })
        ));
    }

    #[test]
    fn bad_key_lists_are_refused_without_echoing_them() {
        for bad in [
            "k1",
            "k1:notbase64!",
            "k1:AAAA",
            ":AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ] {
            let e = TokenKeys::parse(bad).unwrap_err();
            assert_eq!(e, TokenKeyError::BadKey { position: 1 });
            assert!(!e.to_string().contains("AAECAw"), "{e}");
        }
        assert!(matches!(
            TokenKeys::parse(&format!("{K1},{K1}")),
            Err(TokenKeyError::DuplicateId(_))
        ));
        assert!(TokenKeys::parse("").expect("empty").is_empty());
    }

    #[test]
    fn fingerprints_differ_and_hide_the_token() {
        assert_ne!(fingerprint("a"), fingerprint("b"));
        assert_eq!(fingerprint("a").len(), 16);
    }
}
