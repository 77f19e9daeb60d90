//! The manual Facebook Login dialog URL for Login Connect, and its JS SDK equivalent.
//!
//! ```text
//! https://www.facebook.com/{version}/dialog/oauth?client_id=…&redirect_uri=…
//!     &scope=…,user_messenger_contact&messenger_page_id=…&auth_type=rerequest&state=…
//!     [&reset_messenger_state=1]
//! ```
//!
//! `auth_type=rerequest` asks again for a permission the person declined earlier;
//! `reset_messenger_state=1` re-triggers the opt-in for people with a role in the app only
//! (development), so it is added only on request.

use url::Url;

use crate::login::login_id::is_facebook_id;

/// The permission that shows the Messenger consent screen.
pub const MESSENGER_SCOPE: &str = "user_messenger_contact";
/// Graph/dialog version used when none is given.
pub const DEFAULT_DIALOG_VERSION: &str = "v25.0";
/// Longest caller-given `state` accepted.
const MAX_STATE_LEN: usize = 512;

/// What the dialog URL is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginDialog {
    /// The Login app id (`client_id`).
    pub app_id: String,
    /// Where Facebook sends the person back (must be a valid OAuth redirect URI of the app).
    pub redirect_uri: String,
    /// The Page whose Messenger the person opts in to (`messenger_page_id`).
    pub page_id: String,
    /// Permissions besides `user_messenger_contact` (items may be comma- or space-separated;
    /// `user_messenger_contact` is added once whatever is given).
    pub scopes: Vec<String>,
    /// The CSRF `state` to send; a random one is generated when `None`.
    pub state: Option<String>,
    /// Adds `reset_messenger_state=1` (works for people with a role in the app only).
    pub reset_messenger_state: bool,
    /// Dialog version, e.g. `v25.0`.
    pub api_version: String,
}

/// The built dialog: the URL, the `state` in it, and the JS SDK call doing the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialogLink {
    /// The full dialog URL, percent-encoded.
    pub url: Url,
    /// The `state` parameter in it (check it when the person comes back).
    pub state: String,
    /// The comma-separated scope in it.
    pub scope: String,
    /// `FB.login(…)` with the same scope and page.
    pub js_snippet: String,
}

/// Why a dialog URL cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogError {
    /// The app id is not digits.
    #[error("app id must be digits, e.g. 1234567890")]
    BadAppId,
    /// The page id is not digits.
    #[error("page id must be digits, e.g. 1234567890")]
    BadPageId,
    /// The redirect URI is not an absolute http(s) URL without a fragment.
    #[error("redirect URI must be an absolute http(s) URL without a #fragment: {0}")]
    BadRedirectUri(String),
    /// A permission name has characters permissions never have.
    #[error("invalid permission {0:?} in scope: use names like email or public_profile")]
    BadScope(String),
    /// The version is not like `v25.0`.
    #[error("API version must look like v25.0, got {0:?}")]
    BadVersion(String),
    /// The given state is empty or too long.
    #[error("state must be 1 to 512 characters")]
    BadState,
}

/// The scope list: the given permissions split on commas and whitespace, de-duplicated in
/// order, with `user_messenger_contact` exactly once, last.
pub fn scope_list(requested: &[String]) -> Result<Vec<String>, DialogError> {
    let mut out: Vec<String> = Vec::new();
    let items = requested
        .iter()
        .flat_map(|s| s.split(|c: char| c == ',' || c.is_whitespace()))
        .filter(|s| !s.is_empty());
    for item in items {
        let valid = item
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(DialogError::BadScope(item.to_owned()));
        }
        if item != MESSENGER_SCOPE && !out.iter().any(|s| s == item) {
            out.push(item.to_owned());
        }
    }
    out.push(MESSENGER_SCOPE.to_owned());
    Ok(out)
}

/// A random `state`: 128 bits from the OS generator, as hex.
pub fn random_state() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn valid_version(v: &str) -> bool {
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let Some((major, minor)) = rest.split_once('.') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    digits(major) && digits(minor)
}

impl LoginDialog {
    /// A dialog for `app_id`, `redirect_uri` and `page_id` with no extra scope, a random
    /// state, no reset, and the default version.
    pub fn new(app_id: &str, redirect_uri: &str, page_id: &str) -> Self {
        Self {
            app_id: app_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            page_id: page_id.to_owned(),
            scopes: Vec::new(),
            state: None,
            reset_messenger_state: false,
            api_version: DEFAULT_DIALOG_VERSION.to_owned(),
        }
    }

    /// Validates the inputs and builds the URL and the JS snippet.
    pub fn build(&self) -> Result<DialogLink, DialogError> {
        if !is_facebook_id(&self.app_id) {
            return Err(DialogError::BadAppId);
        }
        if !is_facebook_id(&self.page_id) {
            return Err(DialogError::BadPageId);
        }
        if !valid_version(&self.api_version) {
            return Err(DialogError::BadVersion(self.api_version.clone()));
        }
        let redirect = Url::parse(self.redirect_uri.trim())
            .map_err(|e| DialogError::BadRedirectUri(e.to_string()))?;
        if !matches!(redirect.scheme(), "http" | "https") {
            return Err(DialogError::BadRedirectUri(
                "scheme must be http or https".into(),
            ));
        }
        if redirect.fragment().is_some() {
            return Err(DialogError::BadRedirectUri("remove the #fragment".into()));
        }
        let state = match &self.state {
            Some(s) if s.is_empty() || s.len() > MAX_STATE_LEN => {
                return Err(DialogError::BadState);
            }
            Some(s) => s.clone(),
            None => random_state(),
        };
        let scope = scope_list(&self.scopes)?.join(",");
        let base = format!("https://www.facebook.com/{}/dialog/oauth", self.api_version);
        let mut url = Url::parse(&base).map_err(|e| DialogError::BadVersion(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &self.app_id)
                .append_pair("redirect_uri", redirect.as_str())
                .append_pair("scope", &scope)
                .append_pair("messenger_page_id", &self.page_id)
                .append_pair("auth_type", "rerequest")
                .append_pair("state", &state);
            if self.reset_messenger_state {
                q.append_pair("reset_messenger_state", "1");
            }
        }
        // Scope names are [a-z0-9_] and the page id digits, so nothing needs JS escaping.
        // The page id is a string: ids can exceed 2^53, where a JS number loses digits.
        let reset = if self.reset_messenger_state {
            ", reset_messenger_state: 1"
        } else {
            ""
        };
        let js_snippet = format!(
            "FB.login(function (response) {{ /* response.authResponse.userID is the asid */ }}, \
             {{scope: '{scope}', messenger_page_id: '{}', auth_type: 'rerequest'{reset}}});",
            self.page_id
        );
        Ok(DialogLink {
            url,
            state,
            scope,
            js_snippet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(url: &Url, name: &str) -> Option<String> {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    #[test]
    fn builds_the_documented_url() {
        let mut d = LoginDialog::new("111", "https://shop.example/cb?x=1&y=a b", "222");
        d.scopes = vec!["email".into()];
        d.state = Some("s/1&2=3".into());
        let link = d.build().expect("valid");
        let url = &link.url;
        assert_eq!(url.host_str(), Some("www.facebook.com"));
        assert_eq!(url.path(), "/v25.0/dialog/oauth");
        assert_eq!(param(url, "client_id").as_deref(), Some("111"));
        assert_eq!(
            param(url, "redirect_uri").as_deref(),
            Some("https://shop.example/cb?x=1&y=a%20b")
        );
        assert_eq!(
            param(url, "scope").as_deref(),
            Some("email,user_messenger_contact")
        );
        assert_eq!(param(url, "messenger_page_id").as_deref(), Some("222"));
        assert_eq!(param(url, "auth_type").as_deref(), Some("rerequest"));
        assert_eq!(param(url, "state").as_deref(), Some("s/1&2=3"));
        assert_eq!(param(url, "reset_messenger_state"), None);
        // Reserved characters of the values are encoded, not passed through.
        let query = url.query().expect("query");
        assert!(
            query.contains("redirect_uri=https%3A%2F%2Fshop.example%2Fcb%3Fx%3D1%26y%3Da%2520b")
        );
        assert!(query.contains("state=s%2F1%262%3D3"));
        assert_eq!(query.matches('&').count(), 5, "six parameters: {query}");
    }

    #[test]
    fn scope_has_user_messenger_contact_exactly_once() {
        let cases: [(&[&str], &str); 5] = [
            (&[], "user_messenger_contact"),
            (&["user_messenger_contact"], "user_messenger_contact"),
            (
                &["email,user_messenger_contact", "public_profile email"],
                "email,public_profile,user_messenger_contact",
            ),
            (&[" email , ,email "], "email,user_messenger_contact"),
            (
                &["user_messenger_contact,user_messenger_contact,email"],
                "email,user_messenger_contact",
            ),
        ];
        for (given, want) in cases {
            let given: Vec<String> = given.iter().map(|s| (*s).to_owned()).collect();
            assert_eq!(
                scope_list(&given).expect("valid").join(","),
                want,
                "{given:?}"
            );
        }
        assert_eq!(
            scope_list(&["email'); alert(1);//".into()]),
            Err(DialogError::BadScope("email');".into()))
        );
    }

    #[test]
    fn reset_and_random_state() {
        let mut d = LoginDialog::new("111", "https://a.example/cb", "222");
        d.reset_messenger_state = true;
        let a = d.build().expect("valid");
        let b = d.build().expect("valid");
        assert_eq!(param(&a.url, "reset_messenger_state").as_deref(), Some("1"));
        assert_eq!(a.state.len(), 32);
        assert_ne!(a.state, b.state, "a fresh random state each time");
        assert_eq!(param(&a.url, "state"), Some(a.state.clone()));
        assert!(a.js_snippet.contains("reset_messenger_state: 1"));
        assert!(a.js_snippet.starts_with("FB.login("));
        assert!(a.js_snippet.contains("scope: 'user_messenger_contact'"));
        assert!(a.js_snippet.contains("messenger_page_id: '222'"));
    }

    #[test]
    fn refuses_bad_inputs() {
        let ok = LoginDialog::new("111", "https://a.example/cb", "222");
        let with = |f: &dyn Fn(&mut LoginDialog)| {
            let mut d = ok.clone();
            f(&mut d);
            d.build()
        };
        assert_eq!(
            with(&|d| d.app_id = "abc".into()),
            Err(DialogError::BadAppId)
        );
        assert_eq!(
            with(&|d| d.page_id = "".into()),
            Err(DialogError::BadPageId)
        );
        assert!(matches!(
            with(&|d| d.redirect_uri = "/relative".into()),
            Err(DialogError::BadRedirectUri(_))
        ));
        assert!(matches!(
            with(&|d| d.redirect_uri = "ftp://a.example/".into()),
            Err(DialogError::BadRedirectUri(_))
        ));
        assert!(matches!(
            with(&|d| d.redirect_uri = "https://a.example/#x".into()),
            Err(DialogError::BadRedirectUri(_))
        ));
        assert!(matches!(
            with(&|d| d.api_version = "25".into()),
            Err(DialogError::BadVersion(_))
        ));
        assert_eq!(
            with(&|d| d.state = Some(String::new())),
            Err(DialogError::BadState)
        );
        assert!(with(&|d| d.api_version = "v21.0".into()).is_ok());
    }
}
