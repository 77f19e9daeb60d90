//! A signed body split by page: the entries whose page refuses the signature come out, each
//! alone in an envelope of its own (its bytes as received), and the body keeps the rest.
//!
//! Works on the raw JSON (`RawValue`), reading only each entry's `id`, so an entry kept is
//! parsed later exactly as before. A body that cannot be read this far is left whole: the
//! ordinary path keeps it on `messenger.unparsed` or refuses it, as without bindings — its
//! pages cannot be told, so neither can its events be published.

use serde::Deserialize;
use serde_json::value::RawValue;

/// One entry taken out of a body.
#[derive(Debug)]
pub struct TakenOut<R> {
    /// The entry's page.
    pub page_id: String,
    /// Why (the caller's verdict).
    pub why: R,
    /// `{"object":"page","entry":[<entry>]}` with the entry's bytes as received.
    pub body: Vec<u8>,
}

/// A body after [`split`].
#[derive(Debug)]
pub struct Split<R> {
    /// The body without the entries taken out; `None` when none was (use the original).
    pub kept: Option<Vec<u8>>,
    /// The entries taken out, in the body's order.
    pub taken_out: Vec<TakenOut<R>>,
}

#[derive(Deserialize)]
struct EntryId {
    #[serde(default)]
    id: Option<serde_json::Value>,
}

/// Takes out of `body` every entry whose page `check` refuses. Entries without a readable
/// page id stay (the parser sets them aside anyway).
pub fn split<R>(body: &[u8], check: impl Fn(&str) -> Result<(), R>) -> Split<R> {
    let whole = || Split {
        kept: None,
        taken_out: Vec::new(),
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return whole();
    };
    let Ok(envelope) = object_fields(text) else {
        return whole();
    };
    let Some(entries) = envelope
        .iter()
        .find(|(k, _)| k == "entry")
        .and_then(|(_, v)| serde_json::from_str::<Vec<&RawValue>>(v.get()).ok())
    else {
        return whole();
    };
    let mut kept: Vec<&RawValue> = Vec::new();
    let mut taken_out = Vec::new();
    for entry in entries {
        let page_id = serde_json::from_str::<EntryId>(entry.get())
            .ok()
            .and_then(|e| e.id)
            .and_then(|id| match id {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
        match page_id.map(|p| (check(&p), p)) {
            Some((Err(why), page_id)) => taken_out.push(TakenOut {
                page_id,
                why,
                body: format!(r#"{{"object":"page","entry":[{}]}}"#, entry.get()).into_bytes(),
            }),
            _ => kept.push(entry),
        }
    }
    if taken_out.is_empty() {
        return whole();
    }
    // The envelope's other fields as received, the entry list without what was taken out.
    let mut out = String::from("{");
    for (i, (key, value)) in envelope.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::String(key.clone()).to_string());
        out.push(':');
        if key == "entry" {
            out.push('[');
            let list: Vec<&str> = kept.iter().map(|e| e.get()).collect();
            out.push_str(&list.join(","));
            out.push(']');
        } else {
            out.push_str(value.get());
        }
    }
    out.push('}');
    Split {
        kept: Some(out.into_bytes()),
        taken_out,
    }
}

/// The fields of a JSON object in order, values as received.
fn object_fields(text: &str) -> Result<Vec<(String, &RawValue)>, serde_json::Error> {
    let map: ordered::Fields<'_> = serde_json::from_str(text)?;
    Ok(map.0)
}

mod ordered {
    //! An object read into an ordered list of fields, without a map crate.

    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    /// Fields in order.
    pub(super) struct Fields<'a>(pub(super) Vec<(String, &'a RawValue)>);

    impl<'de: 'a, 'a> serde::Deserialize<'de> for Fields<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Fields<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                        out.push((k, v));
                    }
                    Ok(Fields(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse_2(page: &str) -> Result<(), &'static str> {
        if page == "2" { Err("no") } else { Ok(()) }
    }

    #[test]
    fn refused_entries_come_out_alone_and_the_rest_stays() {
        let body = br#"{"object":"page","entry":[{"id":"1","time":1,"messaging":[{"a":1}]},{"id":2,"time":2,"messaging":[{"b":"\u00e9"}]}]}"#;
        let split = split(body, refuse_2);
        let kept = String::from_utf8(split.kept.expect("split")).expect("utf8");
        assert_eq!(
            kept,
            r#"{"object":"page","entry":[{"id":"1","time":1,"messaging":[{"a":1}]}]}"#
        );
        assert_eq!(split.taken_out.len(), 1);
        assert_eq!(split.taken_out[0].page_id, "2");
        assert_eq!(
            String::from_utf8(split.taken_out[0].body.clone()).expect("utf8"),
            r#"{"object":"page","entry":[{"id":2,"time":2,"messaging":[{"b":"\u00e9"}]}]}"#,
            "the entry's bytes as received"
        );
    }

    #[test]
    fn nothing_refused_or_unreadable_leaves_the_body_whole() {
        let body = br#"{"object":"page","entry":[{"id":"1"}]}"#;
        assert!(split(body, refuse_2).kept.is_none());
        assert!(split(b"not json", refuse_2).kept.is_none());
        assert!(
            split(br#"{"object":"page","entry":{}}"#, refuse_2)
                .kept
                .is_none()
        );
    }
}
