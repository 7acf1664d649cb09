//! The one parameter schema language: what API routes declare next to the route and what
//! handler files declare in `params = { .. }` (read from Lua by [`crate::script::schema`]).
//! PVE-style checks with PVE's leniency and error texts: `null` counts as absent, booleans
//! may be `0/1`, `"0"/"1"` or `true/false`, integers may be numeric strings; unknown keys
//! are rejected unless a schema allows them. Validation also normalizes: booleans become
//! JSON booleans, integers become numbers, defaults are filled in. Knows no Lua and no HTTP.

use std::collections::BTreeMap;

use regex_lite::Regex;
use serde_json::{Map, Value};

use crate::ident;

/// A property: its schema plus whether it may be absent and its default.
#[derive(Debug, Clone)]
pub struct Prop {
    pub schema: Schema,
    pub optional: bool,
    pub default: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Schema {
    String {
        allowed: Option<Vec<String>>,
        pattern: Option<Regex>,
        format: Option<String>,
        min_length: Option<usize>,
        max_length: Option<usize>,
    },
    Integer {
        min: Option<i64>,
        max: Option<i64>,
    },
    Number {
        min: Option<f64>,
        max: Option<f64>,
    },
    Boolean,
    Object {
        props: BTreeMap<String, Prop>,
        additional: bool,
    },
    /// `items` is checked per element; PVE's `members` is not (kept unchecked on purpose).
    /// `max_items` (`maxItems`) bounds the length, whichever of the two is used.
    Array {
        items: Option<Box<Schema>>,
        max_items: Option<usize>,
    },
    Any,
}

/// The `format` names a string property may use.
pub const FORMATS: &[&str] = &[
    "pve-storage-id",
    "pve-node",
    "pve-vmid",
    "pve-volume-id",
    "pve-configid",
    "safe-path",
    "pve-storage-id-list",
    "pve-bridge-id-list",
];

/// Why `value` does not have `format` (a known one, see [`FORMATS`]), if it does not.
fn check_format(format: &str, value: &str) -> Option<String> {
    let list = |valid: fn(&str) -> bool, what: &str| {
        ident::split_id_list(value)
            .into_iter()
            .find(|id| !valid(id))
            .map(|id| format!("invalid format - value '{id}' does not look like a valid {what} ID"))
    };
    let ok = match format {
        "pve-storage-id" => ident::is_storage_id(value),
        "pve-node" => ident::is_node_name(value),
        "pve-vmid" => ident::is_vmid(value),
        "pve-volume-id" => value
            .split_once(':')
            .is_some_and(|(s, n)| ident::is_storage_id(s) && !n.is_empty()),
        "pve-configid" => ident::is_config_id(value),
        "safe-path" => value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b)),
        "pve-storage-id-list" => return list(ident::is_storage_id, "storage"),
        "pve-bridge-id-list" => return list(ident::is_bridge_id, "bridge"),
        _ => false,
    };
    if ok {
        return None;
    }
    Some(
        match format {
            "pve-storage-id" => "invalid format - storage ID",
            "pve-node" => "invalid format - node name",
            "pve-vmid" => "invalid format - VM ID",
            "pve-volume-id" => "invalid format - unable to parse volume ID",
            "pve-configid" => "invalid format - invalid configuration ID",
            _ => "invalid format",
        }
        .to_string(),
    )
}

/// Declaring properties in Rust (API routes): `Prop::string().optional().format("pve-node")`.
impl Prop {
    fn of(schema: Schema) -> Prop {
        Prop {
            schema,
            optional: false,
            default: None,
        }
    }

    pub fn string() -> Prop {
        Prop::of(Schema::String {
            allowed: None,
            pattern: None,
            format: None,
            min_length: None,
            max_length: None,
        })
    }

    pub fn integer() -> Prop {
        Prop::of(Schema::Integer {
            min: None,
            max: None,
        })
    }

    pub fn boolean() -> Prop {
        Prop::of(Schema::Boolean)
    }

    /// Accepted as given, unchecked.
    pub fn any() -> Prop {
        Prop::of(Schema::Any)
    }

    pub fn optional(mut self) -> Prop {
        self.optional = true;
        self
    }

    /// Sets the `format` of a string property (one of [`FORMATS`]).
    pub fn format(mut self, name: &str) -> Prop {
        if let Schema::String { format, .. } = &mut self.schema {
            *format = Some(name.to_string());
        }
        self
    }

    /// Restricts a string property to `values` (PVE's `enum`).
    pub fn one_of(mut self, values: &[&str]) -> Prop {
        if let Schema::String { allowed, .. } = &mut self.schema {
            *allowed = Some(values.iter().map(|v| v.to_string()).collect());
        }
        self
    }

    /// Sets the `minimum` of an integer property.
    pub fn minimum(mut self, n: i64) -> Prop {
        if let Schema::Integer { min, .. } = &mut self.schema {
            *min = Some(n);
        }
        self
    }
}

/// A table of named properties, as routes declare them.
pub fn props<const N: usize>(list: [(&str, Prop); N]) -> BTreeMap<String, Prop> {
    list.into_iter().map(|(k, p)| (k.to_string(), p)).collect()
}

impl Schema {
    /// Validates and normalizes `value`; on failure returns (path, reason).
    pub fn validate(&self, path: &str, value: &Value) -> Result<Value, (String, String)> {
        let fail = |reason: String| Err((path.to_string(), reason));
        match self {
            Schema::Any => Ok(value.clone()),
            Schema::Boolean => match crate::util::lenient_bool(value) {
                Some(b) => Ok(Value::Bool(b)),
                None => fail(format!(
                    "type check ('boolean') failed - got '{}'",
                    show(value)
                )),
            },
            Schema::Integer { min, max } => {
                let n = match value {
                    Value::Number(n) => n.as_i64().or_else(|| {
                        n.as_f64()
                            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                            .map(|f| f as i64)
                    }),
                    Value::String(s) => s.trim().parse::<i64>().ok(),
                    _ => None,
                };
                let Some(n) = n else {
                    return fail(format!(
                        "type check ('integer') failed - got '{}'",
                        show(value)
                    ));
                };
                if let Some(m) = min
                    && n < *m
                {
                    return fail(format!("value must have a minimum value of {m}"));
                }
                if let Some(m) = max
                    && n > *m
                {
                    return fail(format!("value must have a maximum value of {m}"));
                }
                Ok(Value::from(n))
            }
            Schema::Number { min, max } => {
                let n = match value {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse::<f64>().ok(),
                    _ => None,
                };
                let Some(n) = n.filter(|f| f.is_finite()) else {
                    return fail(format!(
                        "type check ('number') failed - got '{}'",
                        show(value)
                    ));
                };
                if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
                    return fail("value out of range".into());
                }
                Ok(value.clone())
            }
            Schema::String {
                allowed,
                pattern,
                format,
                min_length,
                max_length,
            } => {
                let s = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => {
                        return fail(format!(
                            "type check ('string') failed - got '{}'",
                            show(value)
                        ));
                    }
                };
                if let Some(allowed) = allowed
                    && !allowed.contains(&s)
                {
                    return fail(format!(
                        "value '{s}' does not have a value in the enumeration '{}'",
                        allowed.join(", ")
                    ));
                }
                if let Some(m) = min_length
                    && s.len() < *m
                {
                    return fail(format!("value must be at least {m} characters long"));
                }
                if max_length.is_some_and(|m| s.len() > m) {
                    return fail(format!(
                        "value may only be {} characters long",
                        max_length.unwrap_or(0)
                    ));
                }
                if let Some(re) = pattern
                    && !re.is_match(&s)
                {
                    return fail("value does not match the regex pattern".to_string());
                }
                if let Some(f) = format
                    && let Some(reason) = check_format(f, &s)
                {
                    return fail(reason);
                }
                Ok(Value::String(s))
            }
            Schema::Array { items, max_items } => {
                let Value::Array(list) = value else {
                    return fail(format!(
                        "type check ('array') failed - got '{}'",
                        show(value)
                    ));
                };
                if let Some(m) = max_items
                    && list.len() > *m
                {
                    return fail(format!(
                        "array may contain at most {m} items, got {}",
                        list.len()
                    ));
                }
                match items {
                    None => Ok(value.clone()),
                    Some(item) => list
                        .iter()
                        .enumerate()
                        .map(|(i, v)| item.validate(&format!("{path}[{i}]"), v))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Value::Array),
                }
            }
            Schema::Object { props, additional } => {
                let Value::Object(map) = value else {
                    return fail(format!(
                        "type check ('object') failed - got '{}'",
                        show(value)
                    ));
                };
                validate_object(path, props, *additional, map).map_err(|mut errs| {
                    errs.pop_first()
                        .unwrap_or_else(|| (path.to_string(), "invalid".into()))
                })
            }
        }
    }
}

/// Validates an object's properties; collects every error as (path, reason).
pub fn validate_object(
    path: &str,
    props: &BTreeMap<String, Prop>,
    additional: bool,
    map: &Map<String, Value>,
) -> Result<Value, BTreeMap<String, String>> {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    let mut errors = BTreeMap::new();
    let mut failed = std::collections::BTreeSet::new();
    let mut out = Map::new();
    for (key, value) in map {
        if value.is_null() {
            continue;
        }
        match props.get(key) {
            Some(prop) => match prop.schema.validate(&join(key), value) {
                Ok(v) => {
                    out.insert(key.clone(), v);
                }
                Err((p, reason)) => {
                    failed.insert(key.clone());
                    errors.insert(p, reason);
                }
            },
            None if additional => {
                out.insert(key.clone(), value.clone());
            }
            None => {
                errors.insert(
                    join(key),
                    "property is not defined in schema and the schema does not allow additional properties".into(),
                );
            }
        }
    }
    for (key, prop) in props {
        if out.contains_key(key) || failed.contains(key) {
            continue;
        }
        match &prop.default {
            Some(d) => {
                out.insert(key.clone(), d.clone());
            }
            None if !prop.optional => {
                errors.insert(
                    join(key),
                    "property is missing and it is not optional".into(),
                );
            }
            None => {}
        }
    }
    if errors.is_empty() {
        Ok(Value::Object(out))
    } else {
        Err(errors)
    }
}

/// PVE's text for a failed parameter check.
pub fn format_errors(errors: &BTreeMap<String, String>) -> String {
    let mut msg = String::from("400 Parameter verification failed.\n");
    for (k, v) in errors {
        msg.push_str(&format!("{k}: {v}\n"));
    }
    msg
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn declared_props_check_like_handler_schemas() {
        let p = props([
            (
                "storages",
                Prop::string().format("pve-storage-id-list").optional(),
            ),
            ("start", Prop::integer().minimum(0).optional()),
            ("download", Prop::boolean().optional()),
            ("socket", Prop::string()),
        ]);
        let ok = json!({"storages": "local, b-2", "start": "3", "download": "1", "socket": "/s"});
        let Value::Object(ok) = ok else {
            unreachable!()
        };
        assert_eq!(
            validate_object("", &p, false, &ok).unwrap(),
            json!({"storages": "local, b-2", "start": 3, "download": true, "socket": "/s"})
        );
        let bad = json!({"storages": "local,Bad!", "start": -1, "x": 1});
        let Value::Object(bad) = bad else {
            unreachable!()
        };
        let errors = validate_object("", &p, false, &bad).unwrap_err();
        assert_eq!(
            errors["storages"],
            "invalid format - value 'Bad!' does not look like a valid storage ID"
        );
        assert_eq!(errors["start"], "value must have a minimum value of 0");
        assert_eq!(
            errors["socket"],
            "property is missing and it is not optional"
        );
        assert!(errors["x"].starts_with("property is not defined in schema"));
    }
}
