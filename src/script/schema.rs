//! Reads the parameter schemas handler files declare (`params = { .. }`) into the
//! [`crate::schema`] language, refusing unknown keys and types at load time.

use std::collections::BTreeMap;

use mlua::{Table, Value as LuaValue};
use regex_lite::Regex;
use serde_json::Value;

pub use crate::schema::{Prop, Schema, format_errors, validate_object};

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
                    && !crate::schema::FORMATS.contains(&f.as_str())
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
