//! Fuzzes the `PAGES_FILE` parser and validator with arbitrary text.
//!
//! Beyond "never panics": an error never shows a token taken from the environment (the
//! parser promises to name fields, never values), and a page that loads never renders a first
//! message outside Meta's text limits, whichever variant is chosen and whatever it lacks.
#![no_main]

use lc_meta::pages::{MAX_TEXT_CHARS, MessageVariables, PagesConfig};
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
        Ok(config) => {
            assert!(
                !format!("{config:?}").contains(TOKEN),
                "Debug shows a token"
            );
            let none = MessageVariables::default();
            for page in &config.pages {
                let refs = page.first_message.variants.iter().flat_map(|v| &v.refs);
                for r in refs.map(|r| Some(r.as_str())).chain([None]) {
                    let text = page.first_message.render(r, &none).message.text;
                    let n = text.chars().count();
                    assert!((1..=MAX_TEXT_CHARS).contains(&n), "rendered {n} characters");
                }
            }
        }
        Err(e) => {
            if !text.contains(TOKEN) {
                assert!(!e.to_string().contains(TOKEN), "error shows a token: {e}");
            }
        }
    }
});
