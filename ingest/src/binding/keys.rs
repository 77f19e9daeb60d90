//! The secrets ingest verifies deliveries with, and which app each belongs to.

use std::collections::{BTreeSet, HashMap};

use lc_meta::secret::Secret;
use lc_meta::signature::{SignatureError, SignatureVerifier};
use lc_shared::registry::Bindings;

use super::{Refusal, SecretVars};

/// What `signed_by` says for a secret of `META_APP_SECRETS` (the deployment's own app).
pub const DEPLOYMENT_SECRETS: &str = "META_APP_SECRETS";

/// The secrets and the bindings in use: built from `META_APP_SECRETS` and one reading of
/// the registry, replaced as a whole when the registry changes.
#[derive(Debug)]
pub struct Keys {
    verifier: SignatureVerifier,
    /// For each secret of the verifier, in order: the apps whose secret it is (empty for a
    /// secret of `META_APP_SECRETS` only).
    owners: Vec<BTreeSet<String>>,
    /// How many secrets, first in the list, come from `META_APP_SECRETS`.
    base: usize,
    /// Page → its app.
    page_app: HashMap<String, String>,
    /// App → the variable naming its secret, for apps whose variable is not set here.
    unset: HashMap<String, String>,
}

/// The apps that signed one delivery.
#[derive(Debug)]
pub struct Verified<'a> {
    keys: &'a Keys,
    apps: BTreeSet<&'a str>,
    deployment: bool,
}

impl Keys {
    /// The keys for `base` (`META_APP_SECRETS`) and `bindings`, each app's secret read from
    /// `vars`. An app whose variable is not set is logged once here; its pages are refused
    /// ([`Refusal::AppSecretNotSet`]) until it is.
    pub fn build(
        base: &[Secret],
        bindings: &Bindings,
        vars: &SecretVars,
        accept_sha1: bool,
    ) -> Self {
        let mut secrets: Vec<Secret> = Vec::new();
        let mut owners: Vec<BTreeSet<String>> = Vec::new();
        for s in base {
            if !secrets.iter().any(|k| k.expose() == s.expose()) {
                secrets.push(s.clone());
                owners.push(BTreeSet::new());
            }
        }
        let base = secrets.len();
        let mut unset = HashMap::new();
        let mut apps: Vec<(&String, &String)> = bindings.app_secret_env.iter().collect();
        apps.sort();
        for (app, var) in apps {
            let Some(secret) = vars.get(var) else {
                tracing::warn!(app_id = %app, var = %var, "app secret variable not set on this ingest: deliveries for the app's pages are set aside (app_secret_not_set) until it is");
                unset.insert(app.clone(), var.clone());
                continue;
            };
            // One secret shared by two entries (an app whose secret is also in
            // META_APP_SECRETS) is one key owned by both.
            match secrets.iter().position(|k| k.expose() == secret.expose()) {
                Some(i) => {
                    owners[i].insert(app.clone());
                }
                None => {
                    secrets.push(secret);
                    owners.push(BTreeSet::from([app.clone()]));
                }
            }
        }
        Self {
            verifier: SignatureVerifier::new(&secrets, accept_sha1),
            owners,
            base,
            page_app: bindings.page_app.clone(),
            unset,
        }
    }

    /// Whether any page is bound to an app (else every entry is accepted as before).
    pub fn any_binding(&self) -> bool {
        !self.page_app.is_empty()
    }

    /// Verifies the signature with every secret; on success, which apps signed.
    pub fn verify(
        &self,
        sha256_header: Option<&str>,
        sha1_header: Option<&str>,
        body: &[u8],
    ) -> Result<Verified<'_>, SignatureError> {
        let matched = self.verifier.matching(sha256_header, sha1_header, body)?;
        let mut apps = BTreeSet::new();
        let mut deployment = false;
        for i in matched {
            deployment |= i < self.base;
            if let Some(owners) = self.owners.get(i) {
                apps.extend(owners.iter().map(String::as_str));
            }
        }
        Ok(Verified {
            keys: self,
            apps,
            deployment,
        })
    }
}

impl Verified<'_> {
    /// Whether an entry for `page_id` is accepted (see the module doc of [`super`]).
    pub fn check(&self, page_id: &str) -> Result<(), Refusal> {
        let Some(app) = self.keys.page_app.get(page_id) else {
            return Ok(());
        };
        if self.apps.contains(app.as_str()) {
            return Ok(());
        }
        match self.keys.unset.get(app) {
            Some(var) => Err(Refusal::AppSecretNotSet {
                page_app: app.clone(),
                var: var.clone(),
            }),
            None => Err(Refusal::OtherApp {
                page_app: app.clone(),
            }),
        }
    }

    /// Who signed: app ids, and [`DEPLOYMENT_SECRETS`] for a secret of that list only.
    pub fn signed_by(&self) -> Vec<String> {
        let mut out: Vec<String> = self.apps.iter().map(|a| (*a).to_owned()).collect();
        if self.deployment {
            out.push(DEPLOYMENT_SECRETS.to_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use lc_meta::signature::sign_sha256;

    use super::*;

    fn bindings() -> Bindings {
        Bindings {
            app_secret_env: HashMap::from([
                ("1".into(), "A_SECRET".into()),
                ("2".into(), "B_SECRET".into()),
                ("3".into(), "C_SECRET".into()),
            ]),
            page_app: HashMap::from([
                ("10".into(), "1".into()),
                ("20".into(), "2".into()),
                ("30".into(), "3".into()),
            ]),
        }
    }

    fn keys() -> Keys {
        let vars = SecretVars::given([
            ("A_SECRET".to_owned(), Secret::new("a")),
            ("B_SECRET".to_owned(), Secret::new(" b ")),
        ]);
        Keys::build(&[Secret::new("base")], &bindings(), &vars, false)
    }

    #[test]
    fn a_page_is_accepted_only_for_its_apps_secret() {
        let keys = keys();
        let body = b"{}";
        let by_a = keys
            .verify(Some(&sign_sha256("a", body)), None, body)
            .expect("a");
        assert_eq!(by_a.check("10"), Ok(()));
        assert_eq!(
            by_a.check("20"),
            Err(Refusal::OtherApp {
                page_app: "2".into()
            })
        );
        assert_eq!(
            by_a.check("30"),
            Err(Refusal::AppSecretNotSet {
                page_app: "3".into(),
                var: "C_SECRET".into()
            })
        );
        assert_eq!(by_a.check("99"), Ok(()), "an unbound page: any secret");
        assert_eq!(by_a.signed_by(), ["1"]);
        let by_b = keys
            .verify(Some(&sign_sha256("b", body)), None, body)
            .expect("b");
        assert_eq!(by_b.check("20"), Ok(()));
        let by_base = keys
            .verify(Some(&sign_sha256("base", body)), None, body)
            .expect("base");
        assert!(by_base.check("10").is_err());
        assert_eq!(by_base.check("99"), Ok(()));
        assert_eq!(by_base.signed_by(), [DEPLOYMENT_SECRETS]);
        assert!(
            keys.verify(Some(&sign_sha256("x", body)), None, body)
                .is_err()
        );
    }

    #[test]
    fn without_bindings_every_secret_signs_every_page() {
        let keys = Keys::build(
            &[Secret::new("s1"), Secret::new("s2")],
            &Bindings::default(),
            &SecretVars::default(),
            false,
        );
        assert!(!keys.any_binding());
        let body = b"{}";
        for s in ["s1", "s2"] {
            let v = keys
                .verify(Some(&sign_sha256(s, body)), None, body)
                .expect("ok");
            assert_eq!(v.check("10"), Ok(()));
        }
    }
}
