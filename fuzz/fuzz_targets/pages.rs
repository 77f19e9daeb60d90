//! Fuzzes the `PAGES_FILE` parser and validator with arbitrary text.
//!
//! Beyond "never panics": an error never shows a token taken from the environment (the
//! parser promises to name fields, never values).
#![no_main]

use lc_meta::pages::PagesConfig;
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "FUZZ-SECRET-TOKEN-VALUE";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| {
        (name.starts_with("PAGE_TOKEN") || name.ends_with("SECRET")).then(|| TOKEN.to_owned())
    };
    match PagesConfig::parse(text, &env) {
        Ok(config) => assert!(
            !format!("{config:?}").contains(TOKEN),
            "Debug shows a token"
        ),
        Err(e) => {
            if !text.contains(TOKEN) {
                assert!(!e.to_string().contains(TOKEN), "error shows a token: {e}");
            }
        }
    }
});
