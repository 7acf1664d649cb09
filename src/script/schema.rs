//! PVE-style parameter schemas declared by handler files (`params = { .. }`), checked by the
//! core before a handler runs, with PVE's leniency: `null` counts as absent, booleans may be
//! `0/1`, `"0"/"1"` or `true/false`, integers may be numeric strings; unknown keys are
//! rejected unless a schema allows them. Validation also normalizes: booleans become JSON
//! booleans, integers become numbers, defaults are filled in.

use std::collections::BTreeMap;

use mlua::{Table, Value as LuaValue};
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

/// Why a handler's `params` table is not a valid schema (reported at load time).
#[derive(Debug, thiserror::Error)]
#[error("schema of '{path}': {reason}")]
pub struct SchemaError {
    pub path: String,
    pub reason: String,
}

fn schema_err(path: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Known `format` names: what they accept.
fn check_format(format: &str, value: &str) -> Option<&'static str> {
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
        _ => return Some("unknown format"),
    };
    if ok {
        None
    } else {
        Some(match format {
            "pve-storage-id" => "invalid format - storage ID",
            "pve-node" => "invalid format - node name",
            "pve-vmid" => "invalid format - VM ID",
            "pve-volume-id" => "invalid format - unable to parse volume ID",
            "pve-configid" => "invalid format - invalid configuration ID",
            _ => "invalid format",
        })
    }
}

impl Prop {
    /// Parses one property table (`{type = "string", optional = true, ..}`).
    pub fn from_lua(path: &str, table: &Table) -> Result<Prop, SchemaError> {
        let optional = match table.get::<LuaValue>("optional") {
            Ok(LuaValue::Nil) => false,
            Ok(LuaValue::Boolean(b)) => b,
            Ok(LuaValue::Integer(i)) => i != 0,
            _ => return Err(schema_err(path, "'optional' must be a boolean")),
        };
        let default = match table.get::<LuaValue>("default") {
            Ok(LuaValue::Nil) => None,
            Ok(LuaValue::Boolean(b)) => Some(Value::Bool(b)),
            Ok(LuaValue::Integer(i)) => Some(Value::from(i)),
            Ok(LuaValue::Number(n)) => Some(Value::from(n)),
            Ok(LuaValue::String(s)) => Some(Value::String(s.to_string_lossy())),
            _ => return Err(schema_err(path, "'default' must be a scalar")),
        };
        let schema = Schema::from_lua(path, table)?;
        let default = match default {
            Some(d) => Some(
                schema
                    .validate(path, &d)
                    .map_err(|e| schema_err(path, format!("bad default: {}", e.1)))?,
            ),
            None => None,
        };
        Ok(Prop {
            schema,
            optional,
            default,
        })
    }
}

const KNOWN_KEYS: &[&str] = &[
    "type",
    "optional",
    "default",
    "description",
    "enum",
    "pattern",
    "format",
    "maxLength",
    "minimum",
    "maximum",
    "properties",
    "additionalProperties",
    "items",
    "members",
    "maxItems",
];

impl Schema {
    pub fn from_lua(path: &str, table: &Table) -> Result<Schema, SchemaError> {
        for pair in table.pairs::<LuaValue, LuaValue>() {
            let (k, _) = pair.map_err(|e| schema_err(path, e.to_string()))?;
            let key = match &k {
                LuaValue::String(s) => s.to_string_lossy(),
                _ => return Err(schema_err(path, "keys must be strings")),
            };
            if !KNOWN_KEYS.contains(&key.as_str()) {
                return Err(schema_err(path, format!("unknown schema key '{key}'")));
            }
        }
        let get_str = |k: &str| -> Result<Option<String>, SchemaError> {
            match table.get::<LuaValue>(k) {
                Ok(LuaValue::Nil) => Ok(None),
                Ok(LuaValue::String(s)) => Ok(Some(s.to_string_lossy())),
                _ => Err(schema_err(path, format!("'{k}' must be a string"))),
            }
        };
        let get_num = |k: &str| -> Result<Option<f64>, SchemaError> {
            match table.get::<LuaValue>(k) {
                Ok(LuaValue::Nil) => Ok(None),
                Ok(LuaValue::Integer(i)) => Ok(Some(i as f64)),
                Ok(LuaValue::Number(n)) => Ok(Some(n)),
                _ => Err(schema_err(path, format!("'{k}' must be a number"))),
            }
        };
        let kind = get_str("type")?.ok_or_else(|| schema_err(path, "'type' missing"))?;
        Ok(match kind.as_str() {
            "string" => {
                let allowed = match table.get::<LuaValue>("enum") {
                    Ok(LuaValue::Nil) => None,
                    Ok(LuaValue::Table(t)) => Some(
                        t.sequence_values::<String>()
                            .collect::<mlua::Result<Vec<_>>>()
                            .map_err(|_| schema_err(path, "'enum' must list strings"))?,
                    ),
                    _ => return Err(schema_err(path, "'enum' must be a list")),
                };
                let pattern = match get_str("pattern")? {
                    Some(p) => Some(
                        Regex::new(&format!("^(?:{p})$"))
                            .map_err(|e| schema_err(path, format!("bad pattern: {e}")))?,
                    ),
                    None => None,
                };
                let format = get_str("format")?;
                if let Some(f) = &format
                    && check_format(f, "") == Some("unknown format")
                {
                    return Err(schema_err(path, format!("unknown format '{f}'")));
                }
                Schema::String {
                    allowed,
                    pattern,
                    format,
                    max_length: get_num("maxLength")?.map(|n| n as usize),
                }
            }
            "integer" => Schema::Integer {
                min: get_num("minimum")?.map(|n| n as i64),
                max: get_num("maximum")?.map(|n| n as i64),
            },
            "number" => Schema::Number {
                min: get_num("minimum")?,
                max: get_num("maximum")?,
            },
            "boolean" => Schema::Boolean,
            "object" => {
                let props = match table.get::<LuaValue>("properties") {
                    Ok(LuaValue::Nil) => BTreeMap::new(),
                    Ok(LuaValue::Table(t)) => properties_from_lua(path, &t)?,
                    _ => return Err(schema_err(path, "'properties' must be a table")),
                };
                let additional = match table.get::<LuaValue>("additionalProperties") {
                    Ok(LuaValue::Nil) => false,
                    Ok(LuaValue::Boolean(b)) => b,
                    Ok(LuaValue::Integer(i)) => i != 0,
                    _ => return Err(schema_err(path, "'additionalProperties' must be a boolean")),
                };
                Schema::Object { props, additional }
            }
            "array" => {
                let items = match table.get::<LuaValue>("items") {
                    Ok(LuaValue::Nil) => None,
                    Ok(LuaValue::Table(t)) => {
                        Some(Box::new(Schema::from_lua(&format!("{path}[]"), &t)?))
                    }
                    _ => return Err(schema_err(path, "'items' must be a table")),
                };
                let max_items = match get_num("maxItems")? {
                    Some(n) if n >= 0.0 && n.fract() == 0.0 => Some(n as usize),
                    Some(_) => {
                        return Err(schema_err(path, "'maxItems' must be a whole number >= 0"));
                    }
                    None => None,
                };
                Schema::Array { items, max_items }
            }
            "any" => Schema::Any,
            other => return Err(schema_err(path, format!("unknown type '{other}'"))),
        })
    }

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
                    return fail(reason.to_string());
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

/// Parses a `properties` table.
pub fn properties_from_lua(
    path: &str,
    table: &Table,
) -> Result<BTreeMap<String, Prop>, SchemaError> {
    let mut props = BTreeMap::new();
    for pair in table.pairs::<String, Table>() {
        let (name, prop) = pair.map_err(|e| schema_err(path, format!("bad property: {e}")))?;
        let sub = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        props.insert(name, Prop::from_lua(&sub, &prop)?);
    }
    Ok(props)
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
    use super::*;

    #[test]
    fn max_items_bounds_arrays_with_and_without_items() {
        let lua = mlua::Lua::new();
        let t: Table = lua
            .load(r#"return { type = "array", maxItems = 2, members = { type = "string" } }"#)
            .eval()
            .unwrap();
        let schema = Schema::from_lua("storages", &t).unwrap();
        assert_eq!(
            schema.validate("storages", &serde_json::json!(["a", null])),
            Ok(serde_json::json!(["a", null]))
        );
        assert_eq!(
            schema.validate("storages", &serde_json::json!(["a", "b", "c"])),
            Err((
                "storages".to_string(),
                "array may contain at most 2 items, got 3".to_string()
            ))
        );
        let with_items = Schema::Array {
            items: Some(Box::new(Schema::Any)),
            max_items: Some(1),
        };
        assert!(
            with_items
                .validate("x", &serde_json::json!([1, 2]))
                .is_err()
        );
        let bad: Table = lua
            .load(r#"return { type = "array", maxItems = -1 }"#)
            .eval()
            .unwrap();
        assert!(Schema::from_lua("x", &bad).is_err());
    }
}
