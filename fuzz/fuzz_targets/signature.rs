//! Fuzzes the signature header parser and verifier.
//!
//! Input: one selector byte, then the header value and the body separated by the first NUL.
//! Beyond "never panics": a header is accepted only if it is exactly the right MAC of the
//! body (modulo surrounding whitespace and hex case).
#![no_main]

use lc_meta::secret::Secret;
use lc_meta::signature::{SignatureVerifier, sign_sha1, sign_sha256};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "fuzz-app-secret";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let (header, body) = rest.split_at(split);
    let body = body.get(1..).unwrap_or_default();
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    let verifier = SignatureVerifier::new(
        &[Secret::new("other-secret"), Secret::new(KEY)],
        selector & 1 == 1,
    );
    let (sha256, sha1) = match (selector >> 1) & 3 {
        0 => (Some(header), None),
        1 => (None, Some(header)),
        2 => (Some(header), Some(header)),
        _ => (None, None),
    };
    if verifier.verify(sha256, sha1, body).is_ok() {
        let presented = header.trim().to_ascii_lowercase();
        let right = if sha256.is_some() {
            sign_sha256(KEY, body) == presented || sign_sha256("other-secret", body) == presented
        } else {
            sign_sha1(KEY, body) == presented || sign_sha1("other-secret", body) == presented
        };
        assert!(
            right,
            "accepted a signature that is not the body's MAC: {header:?}"
        );
    }
});
