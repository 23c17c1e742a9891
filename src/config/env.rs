//! Environment overrides: `CAUSAL_COMMIT__SECTION__KEY=value`, and the same read from a file
//! with `CAUSAL_COMMIT__SECTION__KEY_FILE=/path` (the file's contents, trailing newline
//! trimmed: how Kubernetes and Compose secrets are mounted). `[kafka.client]` properties are
//! named with underscores for dots: `CAUSAL_COMMIT__KAFKA__CLIENT__SASL_PASSWORD` sets
//! `sasl.password`, `..._SASL_PASSWORD_FILE` reads it from a file.
//!
//! A name ending in `_FILE` is a file reference unless the whole name is itself a key
//! (`CAUSAL_COMMIT__REDIS__CA_FILE` sets `redis.ca_file`; librdkafka's `*.file` properties
//! likewise). Setting a key both ways is an error. Values of keys whose default is a string
//! stay strings (a numeric password is still a password); others are parsed like TOML values.

use std::collections::BTreeMap;

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

use super::ENV_PREFIX;

/// librdkafka properties whose names end in `.file` (paths, set as they are).
const CLIENT_FILE_KEYS: [&str; 3] = [
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.file",
    "sasl.oauthbearer.assertion.jwt.template.file",
];

const FILE_SUFFIX: &str = "_file";

/// The overrides found in a set of environment variables. Holds their values, secrets
/// included, so it has no `Debug`.
pub(super) struct Environment {
    /// `(variable, value)` for every variable with the prefix.
    vars: Vec<(String, String)>,
    /// Every key of the configuration (dotted path) with whether its value is a string.
    keys: BTreeMap<String, bool>,
}

/// Where one variable goes.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// The key's path: sections, then the key (a `kafka.client` property is one part).
    path: Vec<String>,
    /// The variable names a file holding the value.
    from_file: bool,
}

impl Environment {
    /// The process's variables; `defaults` is the configuration's default value as JSON, which
    /// tells which keys exist and which hold strings.
    pub(super) fn from_process(defaults: &serde_json::Value) -> Self {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| has_prefix(k))
            .collect();
        let mut keys = BTreeMap::new();
        collect_keys(defaults, &mut Vec::new(), &mut keys);
        Self { vars, keys }
    }

    /// Maps a variable's name (without the prefix) to its key.
    fn target(&self, name: &str) -> Target {
        let mut path: Vec<String> = name.split("__").map(str::to_ascii_lowercase).collect();
        if path.len() == 3 && path[0] == "kafka" && path[1] == "client" {
            let mut key = path[2].replace('_', ".");
            let from_file = path[2].ends_with(FILE_SUFFIX) && !CLIENT_FILE_KEYS.contains(&&*key);
            if from_file {
                key.truncate(key.len() - FILE_SUFFIX.len());
            }
            path[2] = key;
            return Target { path, from_file };
        }
        let last = path.last().map(String::as_str).unwrap_or("");
        let from_file = last.ends_with(FILE_SUFFIX) && !self.keys.contains_key(&path.join("."));
        if from_file {
            let last = path.last_mut().expect("a name has at least one part");
            last.truncate(last.len() - FILE_SUFFIX.len());
        }
        Target { path, from_file }
    }

    /// The value a variable sets; the error names the variable (never the value).
    fn value(&self, target: &Target, var: &str, raw: &str) -> Result<Value, String> {
        let text = if target.from_file {
            let contents = std::fs::read_to_string(raw)
                .map_err(|e| format!("{var}: cannot read the file {raw:?}: {e}"))?;
            contents.trim_end_matches(['\n', '\r']).to_string()
        } else {
            raw.to_string()
        };
        let is_client_property = target.path.len() == 3 && target.path[..2] == ["kafka", "client"];
        let is_string = is_client_property
            || self
                .keys
                .get(&target.path.join("."))
                .copied()
                .unwrap_or(false);
        Ok(if is_string {
            Value::from(text)
        } else {
            text.parse().expect("parsing a Value is infallible")
        })
    }
}

fn has_prefix(name: &str) -> bool {
    name.len() > ENV_PREFIX.len()
        && name.is_char_boundary(ENV_PREFIX.len())
        && name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
}

fn collect_keys(
    value: &serde_json::Value,
    path: &mut Vec<String>,
    out: &mut BTreeMap<String, bool>,
) {
    if let serde_json::Value::Object(map) = value {
        if !path.is_empty() {
            out.insert(path.join("."), false);
        }
        for (k, v) in map {
            path.push(k.clone());
            collect_keys(v, path, out);
            path.pop();
        }
    } else {
        out.insert(path.join("."), value.is_string());
    }
}

fn insert(dict: &mut Dict, path: &[String], value: Value) {
    let (first, rest) = path.split_first().expect("a key path is not empty");
    if rest.is_empty() {
        dict.insert(first.clone(), value);
        return;
    }
    let entry = dict
        .entry(first.clone())
        .or_insert_with(|| Value::from(Dict::new()));
    if entry.as_dict().is_none() {
        *entry = Value::from(Dict::new());
    }
    if let Value::Dict(_, inner) = entry {
        insert(inner, rest, value);
    }
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("`{ENV_PREFIX}` environment variable(s)")).interpolater(
            |_: &Profile, keys: &[&str]| {
                let keys: Vec<String> = keys
                    .iter()
                    .map(|k| k.replace('.', "_").to_ascii_uppercase())
                    .collect();
                format!("{ENV_PREFIX}{}", keys.join("__"))
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let mut dict = Dict::new();
        let mut set_by: BTreeMap<Vec<String>, &str> = BTreeMap::new();
        for (var, raw) in &self.vars {
            let target = self.target(&var[ENV_PREFIX.len()..]);
            if target.path.iter().any(String::is_empty) {
                return Err(Error::from(format!(
                    "{var}: not a configuration key (sections and keys are separated by `__`)"
                )));
            }
            if let Some(other) = set_by.insert(target.path.clone(), var) {
                return Err(Error::from(format!(
                    "{other} and {var} set the same key `{}`: set one",
                    target.path.join(".")
                )));
            }
            let value = self.value(&target, var, raw).map_err(Error::from)?;
            insert(&mut dict, &target.path, value);
        }
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The keys set through the environment.
    fn targets(env: &Environment) -> BTreeSet<String> {
        env.vars
            .iter()
            .map(|(v, _)| env.target(&v[ENV_PREFIX.len()..]).path.join("|"))
            .collect()
    }

    fn env(vars: &[(&str, &str)]) -> Environment {
        let defaults = serde_json::to_value(crate::config::Config::default()).unwrap();
        let mut keys = BTreeMap::new();
        collect_keys(&defaults, &mut Vec::new(), &mut keys);
        Environment {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            keys,
        }
    }

    #[test]
    fn names_map_to_keys() {
        let e = env(&[
            ("CAUSAL_COMMIT__KAFKA__BROKERS", ""),
            ("CAUSAL_COMMIT__KAFKA__CLIENT__SASL_PASSWORD", ""),
            ("CAUSAL_COMMIT__KAFKA__CLIENT__SSL_KEY_PASSWORD_FILE", ""),
            (
                "CAUSAL_COMMIT__KAFKA__CLIENT__SASL_OAUTHBEARER_ASSERTION_PRIVATE_KEY_FILE",
                "",
            ),
            ("CAUSAL_COMMIT__POSTGRES__URL_FILE", ""),
            ("CAUSAL_COMMIT__REDIS__CA_FILE", ""),
            ("CAUSAL_COMMIT__REDIS__CA_FILE_FILE", ""),
            ("CAUSAL_COMMIT__INSTANCE_ID", ""),
        ]);
        let want: BTreeSet<String> = [
            "kafka|brokers",
            "kafka|client|sasl.password",
            "kafka|client|ssl.key.password",
            "kafka|client|sasl.oauthbearer.assertion.private.key.file",
            "postgres|url",
            "redis|ca_file",
            "instance_id",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(targets(&e), want);
        assert!(e.target("POSTGRES__URL_FILE").from_file);
        assert!(e.target("KAFKA__CLIENT__SSL_KEY_PASSWORD_FILE").from_file);
        assert!(!e.target("REDIS__CA_FILE").from_file);
        assert!(e.target("REDIS__CA_FILE_FILE").from_file);
        assert!(
            !e.target("KAFKA__CLIENT__SASL_OAUTHBEARER_ASSERTION_PRIVATE_KEY_FILE")
                .from_file
        );
    }
}
