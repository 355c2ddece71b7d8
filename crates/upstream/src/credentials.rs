//! Registry credentials from a file in Docker's `config.json` format, which is what a
//! `kubernetes.io/dockerconfigjson` Secret holds: `{"auths": {"<registry>": {"auth":
//! "<base64 user:password>"}}}` or `username` and `password` fields. Each credential is
//! kept under its registry and only ever offered to that registry (and the token service
//! its own 401 names).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use mirrorlet_oci::Registry;
use serde::Deserialize;

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a Docker config.json.
    #[error("not a Docker config.json (expected {{\"auths\": {{...}}}}): {0}")]
    Json(#[source] serde_json::Error),
    /// An entry's key is not a registry.
    #[error("credentials entry {0:?} does not name a registry")]
    BadKey(String),
    /// An entry has neither a usable `auth` nor `username` and `password`.
    #[error(
        "credentials for {0} have neither \"auth\" (base64 of user:password) nor \"username\" and \"password\""
    )]
    BadEntry(String),
}

/// A user name and password for one registry. Its `Debug` form hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Credentials by registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    by_registry: HashMap<Registry, Login>,
}

#[derive(Deserialize)]
struct ConfigJson {
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl Credentials {
    /// No credentials: every registry is pulled anonymously.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads a credentials file.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses the text of a Docker config.json.
    pub fn parse(text: &str) -> Result<Self, CredentialsError> {
        let config: ConfigJson = serde_json::from_str(text).map_err(CredentialsError::Json)?;
        let mut by_registry = HashMap::new();
        for (key, entry) in config.auths {
            let registry =
                registry_of(&key).ok_or_else(|| CredentialsError::BadKey(key.clone()))?;
            let login = entry
                .login()
                .ok_or_else(|| CredentialsError::BadEntry(key.clone()))?;
            by_registry.insert(registry, login);
        }
        Ok(Self { by_registry })
    }

    /// The login for `registry`, if there is one.
    pub fn get(&self, registry: &Registry) -> Option<&Login> {
        self.by_registry.get(registry)
    }

    /// The registries there are credentials for.
    pub fn registries(&self) -> impl Iterator<Item = &Registry> {
        self.by_registry.keys()
    }
}

impl AuthEntry {
    fn login(&self) -> Option<Login> {
        if let (Some(u), Some(p)) = (&self.username, &self.password)
            && !u.is_empty()
        {
            return Some(Login {
                username: u.clone(),
                password: p.clone(),
            });
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.auth.as_deref()?.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        (!u.is_empty()).then(|| Login {
            username: u.to_owned(),
            password: p.to_owned(),
        })
    }
}

/// The registry a config.json key names: `ghcr.io`, `https://index.docker.io/v1/`,
/// `http://10.0.0.5:5000`.
fn registry_of(key: &str) -> Option<Registry> {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next()?;
    Registry::parse(host).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Registry {
        Registry::parse(s).expect("registry")
    }

    #[test]
    fn reads_both_forms_and_normalises_keys() {
        let auth = base64::engine::general_purpose::STANDARD.encode("hub-user:hub:pass");
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                "ghcr.io": {{"username": "gh", "password": "tok"}},
                "http://10.0.0.5:5000/v2/": {{"auth": "{auth}", "email": "x@y"}}
            }}}}"#
        );
        let c = Credentials::parse(&text).expect("parses");
        let hub = c.get(&r("docker.io")).expect("hub");
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hub-user", "hub:pass")
        );
        assert_eq!(c.get(&r("ghcr.io")).expect("ghcr").username, "gh");
        assert!(c.get(&r("10.0.0.5:5000")).is_some());
        assert!(c.get(&r("quay.io")).is_none());
        assert!(
            !format!("{hub:?}").contains("hub:pass"),
            "Debug hides the password"
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(matches!(
            Credentials::parse("[]"),
            Err(CredentialsError::Json(_))
        ));
        assert!(matches!(
            Credentials::parse(r#"{"auths": {"ghcr.io": {"auth": "!!"}}}"#),
            Err(CredentialsError::BadEntry(k)) if k == "ghcr.io"
        ));
        assert!(matches!(
            Credentials::parse(r#"{"auths": {"bad host": {"username": "a", "password": "b"}}}"#),
            Err(CredentialsError::BadKey(_))
        ));
        assert_eq!(
            Credentials::parse(r#"{"auths": {}}"#).expect("empty"),
            Credentials::none()
        );
    }
}

#[cfg(test)]
mod props {
    use base64::Engine as _;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text: no panic.
        #[test]
        fn any_text_is_parsed_or_refused(text in any::<String>()) {
            let _ = Credentials::parse(&text);
        }

        /// A well-formed entry gives back its login for its registry; a malformed `auth`
        /// is refused or ignored, never a panic.
        #[test]
        fn entries_give_back_their_login(
            key in prop_oneof!["[a-z]{1,8}\\.[a-z]{2,4}(:[0-9]{1,5})?", "https?://[a-z.]{1,12}(/v1/)?", any::<String>()],
            user in "[a-zA-Z0-9_]{1,12}",
            password in any::<String>(),
            raw_auth in any::<String>(),
        ) {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            let config = |entry| serde_json::json!({ "auths": { key.clone(): entry } }).to_string();
            for entry in [
                serde_json::json!({ "auth": auth }),
                serde_json::json!({ "username": user, "password": password }),
            ] {
                let parsed = Credentials::parse(&config(entry));
                if let Some(registry) = registry_of(&key) {
                    let c = parsed.expect("a well-formed entry");
                    let login = c.get(&registry).expect("its login");
                    prop_assert_eq!(&login.username, &user);
                    prop_assert_eq!(&login.password, &password);
                }
            }
            let _ = Credentials::parse(&config(serde_json::json!({ "auth": raw_auth })));
        }
    }
}
