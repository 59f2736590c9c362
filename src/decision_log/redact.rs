//! Redaction, applied to every record on the pipeline thread before it is
//! spooled, so nothing unredacted is written to disk or leaves the process.
//!
//! - Configured paths into the record (`context.card.number`,
//!   `principal.id`, `headers.x-user-email`, `context.*.password`; `*`
//!   matches any key) are dropped or replaced by `sha256:<hex>` of a salt and
//!   the value's JSON.
//! - Always, whatever the configuration: any key inside `context` or
//!   `headers`, at any depth, named like a credential (`authorization`,
//!   `cookie`, `x-api-key`, `password`, ... compared case-insensitively, `_`
//!   and `-` alike) is dropped, and any string value that starts with
//!   `Bearer ` or `Basic ` is replaced by `[redacted]`.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Keys never logged, inside `context` and `headers` (normalized: lowercase, `-`).
pub const SECRET_KEYS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-amz-security-token",
    "password",
    "passwd",
    "secret",
    "client-secret",
    "private-key",
    "access-token",
    "refresh-token",
    "id-token",
];

/// What to do with the value at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Drop,
    Hash,
}

/// Compiled redaction rules.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    rules: Vec<(Vec<String>, Action)>,
    salt: String,
}

impl Redactor {
    pub fn new(drop: &[String], hash: &[String], salt: &str) -> Self {
        let split = |path: &String| path.split('.').map(str::to_owned).collect::<Vec<_>>();
        let mut rules: Vec<_> = drop.iter().map(|p| (split(p), Action::Drop)).collect();
        rules.extend(hash.iter().map(|p| (split(p), Action::Hash)));
        Redactor {
            rules,
            salt: salt.to_owned(),
        }
    }

    /// Whether every rule is inside `context` (then [`Self::apply_context`]
    /// and [`Self::keep_header`] redact a record without building it as a
    /// `Value` first).
    pub fn context_only(&self) -> bool {
        self.rules
            .iter()
            .all(|(path, _)| path.first().is_some_and(|p| p == "context") && path.len() > 1)
    }

    /// Whether no rule applies to the context (the secrets are still
    /// stripped, see [`clean_json_line`]).
    pub fn has_context_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|(path, _)| path.first().is_none_or(|p| p == "context" || p == "*"))
    }

    /// Redacts a context object in place (for [`Self::context_only`] rules).
    pub fn apply_context(&self, context: &mut Value) {
        strip_secrets(context);
        for (path, action) in &self.rules {
            apply_path(context, &path[1..], *action, &self.salt);
        }
    }

    /// A request header as it may be logged (for [`Self::context_only`]
    /// rules): `None` for a credential header, `[redacted]` for a
    /// credential value.
    pub fn header_value(name: &str, value: &str) -> Option<String> {
        if is_secret_key(name) {
            return None;
        }
        Some(if is_credential_value(value) {
            "[redacted]".to_owned()
        } else {
            value.to_owned()
        })
    }

    /// Redacts a whole record in place.
    pub fn apply(&self, record: &mut Value) {
        if let Value::Object(map) = record {
            for key in ["context", "headers"] {
                if let Some(value) = map.get_mut(key) {
                    strip_secrets(value);
                }
            }
        }
        for (path, action) in &self.rules {
            apply_path(record, path, *action, &self.salt);
        }
    }
}

/// `json` as one compact line when it is valid JSON that redaction would
/// not change (no rules touch the context, and no secret key or credential
/// value appears at any depth); `None` when it must be parsed and redacted.
/// Checked in one pass without building a `Value`: most contexts are clean,
/// and parsing them into a `Value` to write them out again cost ~4,400
/// instructions per record.
pub fn clean_json_line(json: &str) -> Option<Vec<u8>> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let Scan(clean) = Scan::deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    clean.then(|| minify(json))
}

/// Whitespace outside strings removed (a JSON line must not span lines).
fn minify(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json.as_bytes() {
        if in_string {
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = byte == b'"';
            out.push(byte);
        }
    }
    out
}

/// Deserializes any JSON, remembering whether it is free of secrets.
struct Scan(bool);

impl<'de> Deserialize<'de> for Scan {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScanVisitor)
    }
}

struct ScanVisitor;

impl<'de> Visitor<'de> for ScanVisitor {
    type Value = Scan;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Scan, E> {
        Ok(Scan(true))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Scan, E> {
        Ok(Scan(true))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Scan, E> {
        Ok(Scan(true))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Scan, E> {
        Ok(Scan(true))
    }
    fn visit_unit<E>(self) -> Result<Scan, E> {
        Ok(Scan(true))
    }
    fn visit_str<E>(self, text: &str) -> Result<Scan, E> {
        Ok(Scan(!is_credential_value(text)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Scan, A::Error> {
        let mut clean = true;
        while let Some(Scan(item)) = items.next_element()? {
            clean &= item;
        }
        Ok(Scan(clean))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scan, A::Error> {
        let mut clean = true;
        while let Some(Key(key)) = map.next_key()? {
            let Scan(value) = map.next_value()?;
            clean &= key && value;
        }
        Ok(Scan(clean))
    }
}

/// An object key, remembering whether it is not a secret's name.
struct Key(bool);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(Key(!is_secret_key(key)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// `key`, case-insensitively and with `_` read as `-`, is in [`SECRET_KEYS`].
/// Runs for every key of every record: compares in place, no allocation.
fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|secret| {
        secret.len() == key.len()
            && key.bytes().zip(secret.bytes()).all(|(k, s)| {
                let k = k.to_ascii_lowercase();
                (if k == b'_' { b'-' } else { k }) == s
            })
    })
}

/// A credential as a value: `Bearer …` or `Basic …`, any case.
fn is_credential_value(text: &str) -> bool {
    let bytes = text.as_bytes();
    let starts = |prefix: &[u8]| {
        bytes
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    starts(b"bearer ") || starts(b"basic ")
}

fn strip_secrets(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|key, _| !is_secret_key(key));
            map.values_mut().for_each(strip_secrets);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_secrets),
        Value::String(text) if is_credential_value(text) => {
            *text = "[redacted]".into();
        }
        _ => {}
    }
}

fn hash(value: &Value, salt: &str) -> Value {
    let mut hasher = Sha256::new();
    hasher.update(salt.as_bytes());
    hasher.update(value.to_string().as_bytes());
    let digest = hasher.finalize();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    Value::String(out)
}

fn apply_path(value: &mut Value, path: &[String], action: Action, salt: &str) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Value::Object(map) = value else {
        return;
    };
    let keys: Vec<String> = if first == "*" {
        map.keys().cloned().collect()
    } else if map.contains_key(first) {
        vec![first.clone()]
    } else {
        Vec::new()
    };
    for key in keys {
        if rest.is_empty() {
            match action {
                Action::Drop => {
                    map.remove(&key);
                }
                Action::Hash => {
                    if let Some(v) = map.get_mut(&key) {
                        *v = hash(v, salt);
                    }
                }
            }
        } else if let Some(v) = map.get_mut(&key) {
            apply_path(v, rest, action, salt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_always_dropped_and_paths_applied() {
        let redactor = Redactor::new(
            &["context.card.number".into(), "context.*.pin".into()],
            &["principal.id".into()],
            "salt",
        );
        let mut record = json!({
            "principal": {"type": "User", "id": "alice"},
            "context": {
                "card": {"number": "4111", "brand": "visa"},
                "a": {"pin": 1}, "b": {"pin": 2, "keep": 3},
                "Authorization": "x", "nested": {"x_api_key": "k", "cookie": "c"},
                "note": "Bearer abc.def"
            },
            "headers": {"authorization": "Basic Zm9v", "x-request-id": "r1"}
        });
        redactor.apply(&mut record);
        assert_eq!(record["context"]["card"], json!({"brand": "visa"}));
        assert_eq!(record["context"]["a"], json!({}));
        assert_eq!(record["context"]["b"], json!({"keep": 3}));
        assert!(record["context"].get("Authorization").is_none());
        assert_eq!(record["context"]["nested"], json!({}));
        assert_eq!(record["context"]["note"], json!("[redacted]"));
        assert_eq!(record["headers"], json!({"x-request-id": "r1"}));
        let id = record["principal"]["id"].as_str().unwrap();
        assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
        assert_eq!(record["principal"]["type"], "User");
    }
}
