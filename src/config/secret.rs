//! Which configuration values are secret, and how they are shown: never. `Debug` and `Serialize`
//! (what `show-config` prints) go through here, so a secret reaches no log line and no output.
//!
//! Secret: the password of `postgres.url` and `redis.url` (and any password-like query
//! parameter), `admin.token`, and every `[kafka.client]` property that holds a credential or
//! key material ([`is_secret_client_key`]). User names, hosts and file paths stay visible.

use std::collections::BTreeMap;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret is shown as.
pub const REDACTED: &str = "<redacted>";

/// librdkafka properties holding a credential or key material whose names [`is_secret_client_key`]'s
/// word rule would miss (librdkafka's own list of sensitive properties, less user names and
/// file paths).
const SECRET_CLIENT_KEYS: [&str; 3] = [
    "ssl.key.pem",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.assertion.private.key.pem",
];

/// Whether a `[kafka.client]` property holds a secret: `sasl.password`, `ssl.key.password`,
/// `ssl.keystore.password`, `sasl.oauthbearer.client.secret`, any property with a `password`,
/// `secret` or `passphrase` part, private keys in PEM, and `sasl.oauthbearer.config`.
pub fn is_secret_client_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_CLIENT_KEYS.contains(&key.as_str())
        || key
            .split(['.', '_'])
            .any(|part| matches!(part, "password" | "secret" | "passphrase"))
}

/// Query parameters of a URL that may carry a password (`password=`, `sslpassword=`, `pass=`,
/// `secret=`, `token=` ...).
fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token"].iter().any(|w| name.contains(w))
}

/// A URL as it may be shown: the password of its user info and the values of password-like
/// query parameters replaced by [`REDACTED`]; a string that is not `scheme://...` entirely.
///
/// The user info ends at the last `@` of the URL, so a password with an unescaped `/`, `?` or
/// `@` is still hidden (an `@` later in the URL hides more than needed, never less).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return REDACTED.into();
    };
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:{REDACTED}@")),
            None => out.push_str(&format!("{userinfo}@")),
        }
    }
    let (base, query) = match after.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (after, None),
    };
    out.push_str(base);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if is_secret_parameter(name) => format!("{name}={REDACTED}"),
                _ => param.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// `serialize_with` for a URL holding a password.
pub fn serialize_url<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.expose_secret()))
}

/// `serialize_with` for a secret: [`REDACTED`], or empty when unset (that it is unset is no
/// secret and worth seeing).
pub fn serialize_secret<S: Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    if secret.expose_secret().is_empty() {
        s.serialize_str("")
    } else {
        s.serialize_str(REDACTED)
    }
}

/// The `[kafka.client]` table: librdkafka properties, given to every Kafka client the process
/// makes. Values are strings for librdkafka; TOML numbers and booleans are accepted and turned
/// into strings. `Debug` and `Serialize` show secret values as [`REDACTED`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientProperties(BTreeMap<String, String>);

impl ClientProperties {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every property with its value, secrets included: for building librdkafka clients only.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    fn shown(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_client_key(k) { REDACTED } else { v };
                (k.as_str(), v)
            })
            .collect()
    }
}

impl<'a> IntoIterator for &'a ClientProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for ClientProperties {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl fmt::Debug for ClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.shown()).finish()
    }
}

impl Serialize for ClientProperties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.shown().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ClientProperties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A librdkafka value as TOML or the environment may give it.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Integer(i64),
            Float(f64),
            Bool(bool),
        }
        let map = BTreeMap::<String, Scalar>::deserialize(d)?;
        Ok(map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Scalar::Text(s) => s,
                    Scalar::Integer(n) => n.to_string(),
                    Scalar::Float(x) => x.to_string(),
                    Scalar::Bool(b) => b.to_string(),
                };
                (k, v)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_hidden_and_the_rest_is_kept() {
        for (url, shown) in [
            (
                "postgres://app:hunter2@db:5432/cc?sslmode=verify-full&sslrootcert=/ca.crt",
                "postgres://app:<redacted>@db:5432/cc?sslmode=verify-full&sslrootcert=/ca.crt",
            ),
            (
                "rediss://:hunter2@redis:6380",
                "rediss://:<redacted>@redis:6380",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://user@h", "redis://user@h"),
            (
                "postgres://app@db/cc?password=hunter2&application_name=x",
                "postgres://app@db/cc?password=<redacted>&application_name=x",
            ),
            (
                "redis+unix:///run/redis.sock?pass=hunter2",
                "redis+unix:///run/redis.sock?pass=<redacted>",
            ),
            // Unescaped separators inside the password: still hidden.
            (
                "postgres://app:hun/ter?2@db/cc",
                "postgres://app:<redacted>@db/cc",
            ),
            (
                "postgres://app:a@b@db/cc",
                "postgres://app:<redacted>@db/cc",
            ),
            ("not a url hunter2", "<redacted>"),
        ] {
            let got = redact_url(url);
            assert_eq!(got, shown, "{url}");
            assert!(!got.contains("hunter2") && !got.contains("ter?2"), "{got}");
        }
    }

    #[test]
    fn credential_properties_are_secret_and_others_are_not() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.pem",
            "ssl.key.pem",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_client_key(key), "{key}");
        }
        for key in [
            "sasl.username",
            "sasl.mechanism",
            "security.protocol",
            "ssl.ca.location",
            "ssl.certificate.pem",
            "sasl.oauthbearer.token.endpoint.url",
            "session.timeout.ms",
        ] {
            assert!(!is_secret_client_key(key), "{key}");
        }
    }

    #[test]
    fn client_properties_show_secrets_redacted_but_hand_them_to_clients() {
        let p: ClientProperties = [
            ("sasl.username", "cc"),
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "s3cret"),
        ]
        .into_iter()
        .collect();
        let debug = format!("{p:?}");
        let json = serde_json::to_string(&p).unwrap();
        for shown in [&debug, &json] {
            assert!(
                !shown.contains("hunter2") && !shown.contains("s3cret"),
                "{shown}"
            );
            assert!(
                shown.contains("sasl.username") && shown.contains("cc"),
                "{shown}"
            );
            assert!(shown.contains(REDACTED), "{shown}");
        }
        let given: BTreeMap<_, _> = p.iter().collect();
        assert_eq!(given[&"sasl.password".to_string()], "hunter2");
    }
}
