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
    "minLength",
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
        // Lengths and counts are whole numbers >= 0; `as usize` would turn -1 into 0.
        let get_count = |k: &str| -> Result<Option<usize>, SchemaError> {
            match get_num(k)? {
                Some(n) if n >= 0.0 && n.fract() == 0.0 => Ok(Some(n as usize)),
                Some(_) => Err(schema_err(
                    path,
                    format!("'{k}' must be a whole number >= 0"),
                )),
                None => Ok(None),
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
                    min_length: get_count("minLength")?,
                    max_length: get_count("maxLength")?,
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
                let max_items = get_count("maxItems")?;
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
    //! Every keyword of the schema language and every error text documented in
    //! handlers/README.md ("Parameters: the schema language"). The same texts are checked
    //! on the wire by handlers/schema_spec.lua.

    use super::*;
    use serde_json::json;

    /// Parses `params = {...}` as a handler file would declare it.
    fn params(src: &str) -> Result<BTreeMap<String, Prop>, String> {
        let lua = mlua::Lua::new();
        let t: Table = lua
            .load(format!("return {src}"))
            .eval()
            .expect("test schema is valid Lua");
        properties_from_lua("", &t).map_err(|e| e.to_string())
    }

    /// Validates a request against `params` (extra keys rejected, as for handlers).
    fn check(src: &str, request: Value) -> Result<Value, BTreeMap<String, String>> {
        let props = params(src).expect("test schema loads");
        let Value::Object(map) = request else {
            panic!("request must be an object")
        };
        validate_object("", &props, false, &map)
    }

    /// The single error of a failed check, as `path: reason`.
    fn error(src: &str, request: Value) -> String {
        let errors = check(src, request).expect_err("the check should fail");
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<String>()
    }

    #[test]
    fn types_and_their_leniency() {
        let s = r#"{ s = { type = "string", optional = true }, i = { type = "integer", optional = true },
                    n = { type = "number", optional = true }, b = { type = "boolean", optional = true },
                    a = { type = "any", optional = true }, l = { type = "array", optional = true },
                    o = { type = "object", optional = true } }"#;
        assert_eq!(
            check(
                s,
                json!({"s": 5, "i": "42", "n": "1.5", "b": "yes", "a": [1, {}], "l": [], "o": {}})
            ),
            Ok(json!({"s": "5", "i": 42, "n": "1.5", "b": true, "a": [1, {}], "l": [], "o": {}}))
        );
        assert_eq!(
            check(s, json!({"i": 3.0, "b": 0})),
            Ok(json!({"i": 3, "b": false}))
        );
        for (b, want) in [
            ("1", true),
            ("TRUE", true),
            ("on", true),
            ("off", false),
            ("No", false),
        ] {
            assert_eq!(check(s, json!({ "b": b })), Ok(json!({ "b": want })), "{b}");
        }
        assert_eq!(
            error(s, json!({"s": true})),
            "s: type check ('string') failed - got 'true'"
        );
        assert_eq!(
            error(s, json!({"i": "abc"})),
            "i: type check ('integer') failed - got 'abc'"
        );
        assert_eq!(
            error(s, json!({"i": 1.5})),
            "i: type check ('integer') failed - got '1.5'"
        );
        assert_eq!(
            error(s, json!({"n": "x"})),
            "n: type check ('number') failed - got 'x'"
        );
        assert_eq!(
            error(s, json!({"b": ""})),
            "b: type check ('boolean') failed - got ''"
        );
        assert_eq!(
            error(s, json!({"l": {}})),
            "l: type check ('array') failed - got '{}'"
        );
        assert_eq!(
            error(s, json!({"o": [1]})),
            "o: type check ('object') failed - got '[1]'"
        );
    }

    #[test]
    fn optional_default_null_and_extra_keys() {
        let s = r#"{ need = { type = "string" }, maybe = { type = "integer", optional = 1 },
                    flag = { type = "boolean", optional = true, default = false },
                    mode = { type = "string", default = "migration" } }"#;
        assert_eq!(
            check(s, json!({"need": "x"})),
            Ok(json!({"need": "x", "flag": false, "mode": "migration"}))
        );
        // null counts as absent: a default fills it, a required property is missing.
        assert_eq!(
            check(s, json!({"need": "x", "mode": null, "maybe": null})),
            Ok(json!({"need": "x", "flag": false, "mode": "migration"}))
        );
        assert_eq!(
            error(s, json!({"need": null})),
            "need: property is missing and it is not optional"
        );
        assert_eq!(
            error(s, json!({"need": "x", "extra": 1})),
            "extra: property is not defined in schema and the schema does not allow additional properties"
        );
        // Every failing top-level property is reported, sorted by name.
        let errors = check(s, json!({"maybe": "x", "extra": 1})).unwrap_err();
        assert_eq!(
            format_errors(&errors),
            "400 Parameter verification failed.\n\
             extra: property is not defined in schema and the schema does not allow additional properties\n\
             maybe: type check ('integer') failed - got 'x'\n\
             need: property is missing and it is not optional\n"
        );
    }

    #[test]
    fn string_checks_in_order_enum_length_pattern_format() {
        let s = r#"{ e = { type = "string", optional = true, enum = { "raw", "qcow2" } },
                    len = { type = "string", optional = true, minLength = 2, maxLength = 4 },
                    p = { type = "string", optional = true, pattern = [[[a-z]+\d]], maxLength = 3 } }"#;
        assert_eq!(
            check(s, json!({"e": "raw", "len": "ab", "p": "ab1"})),
            Ok(json!({"e": "raw", "len": "ab", "p": "ab1"}))
        );
        assert_eq!(
            error(s, json!({"e": "vmdk"})),
            "e: value 'vmdk' does not have a value in the enumeration 'raw, qcow2'"
        );
        assert_eq!(
            error(s, json!({"len": "a"})),
            "len: value must be at least 2 characters long"
        );
        assert_eq!(
            error(s, json!({"len": "abcde"})),
            "len: value may only be 4 characters long"
        );
        // The pattern must match the whole value.
        assert_eq!(
            error(s, json!({"p": "1ab"})),
            "p: value does not match the regex pattern"
        );
        assert_eq!(
            error(s, json!({"p": "a1x"})),
            "p: value does not match the regex pattern"
        );
        // maxLength is checked before the pattern.
        assert_eq!(
            error(s, json!({"p": "abcd1"})),
            "p: value may only be 3 characters long"
        );
    }

    #[test]
    fn every_format() {
        let cases = [
            (
                "pve-storage-id",
                "local-lvm",
                "l",
                "invalid format - storage ID",
            ),
            ("pve-node", "node-1", "-node", "invalid format - node name"),
            ("pve-vmid", "100", "0100", "invalid format - VM ID"),
            (
                "pve-volume-id",
                "local:100/x.raw",
                "local:",
                "invalid format - unable to parse volume ID",
            ),
            (
                "pve-configid",
                "scsi0",
                "0scsi",
                "invalid format - invalid configuration ID",
            ),
            ("safe-path", "a/b_c.d-e", "a b", "invalid format"),
        ];
        for (format, good, bad, reason) in cases {
            let s = format!(r#"{{ v = {{ type = "string", format = "{format}" }} }}"#);
            assert_eq!(
                check(&s, json!({ "v": good })),
                Ok(json!({ "v": good })),
                "{format}"
            );
            assert_eq!(
                error(&s, json!({ "v": bad })),
                format!("v: {reason}"),
                "{format}"
            );
        }
        let vmid = r#"{ v = { type = "string", format = "pve-vmid" } }"#;
        assert_eq!(error(vmid, json!({"v": "12"})), "v: invalid format - VM ID");
        assert_eq!(
            error(vmid, json!({"v": "1234567890"})),
            "v: invalid format - VM ID"
        );
    }

    #[test]
    fn integer_and_number_ranges() {
        let s = r#"{ i = { type = "integer", optional = true, minimum = 0, maximum = 10 },
                    n = { type = "number", optional = true, minimum = 0.5, maximum = 1.5 } }"#;
        assert_eq!(
            check(s, json!({"i": 0, "n": 0.5})),
            Ok(json!({"i": 0, "n": 0.5}))
        );
        assert_eq!(
            check(s, json!({"i": "10", "n": 1.5})),
            Ok(json!({"i": 10, "n": 1.5}))
        );
        assert_eq!(
            error(s, json!({"i": -1})),
            "i: value must have a minimum value of 0"
        );
        assert_eq!(
            error(s, json!({"i": 11})),
            "i: value must have a maximum value of 10"
        );
        assert_eq!(error(s, json!({"n": 0.4})), "n: value out of range");
        assert_eq!(error(s, json!({"n": "1.6"})), "n: value out of range");
        // Numbers are not normalized: a numeric string stays a string.
        assert_eq!(check(s, json!({"n": "1.0"})), Ok(json!({"n": "1.0"})));
    }

    #[test]
    fn arrays_items_max_items_and_members() {
        let s = r#"{ l = { type = "array", optional = true, maxItems = 2, items = { type = "integer", minimum = 1 } },
                    m = { type = "array", optional = true, members = { type = "string" } } }"#;
        assert_eq!(check(s, json!({"l": ["1", 2]})), Ok(json!({"l": [1, 2]})));
        assert_eq!(
            error(s, json!({"l": [1, 0]})),
            "l[1]: value must have a minimum value of 1"
        );
        assert_eq!(
            error(s, json!({"l": [1, 2, 3]})),
            "l: array may contain at most 2 items, got 3"
        );
        // `members` is accepted and ignored.
        assert_eq!(
            check(s, json!({"m": [null, 5]})),
            Ok(json!({"m": [null, 5]}))
        );
    }

    #[test]
    fn objects_properties_and_additional_properties() {
        let s = r#"{ drive = { type = "object", additionalProperties = true, properties = {
                        interface = { type = "string", enum = { "scsi", "ide" } },
                        size = { type = "integer", minimum = 1 },
                        cache = { type = "string", optional = true, default = "none" } } },
                    strict = { type = "object", optional = true, properties = { a = { type = "integer", optional = true } } } }"#;
        assert_eq!(
            check(
                s,
                json!({"drive": {"interface": "scsi", "size": "5", "ssd": 1, "x": null}})
            ),
            Ok(json!({"drive": {"interface": "scsi", "size": 5, "ssd": 1, "cache": "none"}}))
        );
        // Only the first failing nested property (by name) is reported.
        assert_eq!(
            error(s, json!({"drive": {"interface": "sata", "size": "abc"}})),
            "drive.interface: value 'sata' does not have a value in the enumeration 'scsi, ide'"
        );
        assert_eq!(
            error(s, json!({"drive": {"interface": "ide"}})),
            "drive.size: property is missing and it is not optional"
        );
        assert_eq!(
            error(
                s,
                json!({"drive": {"interface": "ide", "size": 1}, "strict": {"b": 1}})
            ),
            "strict.b: property is not defined in schema and the schema does not allow additional properties"
        );
    }

    #[test]
    fn load_time_errors() {
        let cases = [
            (
                r#"{ x = { optional = true } }"#,
                "schema of 'x': 'type' missing",
            ),
            (
                r#"{ x = { type = "float" } }"#,
                "schema of 'x': unknown type 'float'",
            ),
            (
                r#"{ x = { type = "string", minlength = 1 } }"#,
                "schema of 'x': unknown schema key 'minlength'",
            ),
            (
                r#"{ x = { type = "string", format = "pve-vm" } }"#,
                "schema of 'x': unknown format 'pve-vm'",
            ),
            (
                r#"{ x = { type = "integer", minimum = 1, default = 0 } }"#,
                "schema of 'x': bad default: value must have a minimum value of 1",
            ),
            (
                r#"{ x = { type = "string", [1] = "a" } }"#,
                "schema of 'x': keys must be strings",
            ),
            (
                r#"{ x = { type = "string", enum = "raw" } }"#,
                "schema of 'x': 'enum' must be a list",
            ),
            (
                r#"{ x = { type = "string", enum = { {} } } }"#,
                "schema of 'x': 'enum' must list strings",
            ),
            (
                r#"{ x = { type = "string", pattern = 5 } }"#,
                "schema of 'x': 'pattern' must be a string",
            ),
            (
                r#"{ x = { type = 5 } }"#,
                "schema of 'x': 'type' must be a string",
            ),
            (
                r#"{ x = { type = "integer", minimum = "1" } }"#,
                "schema of 'x': 'minimum' must be a number",
            ),
            (
                r#"{ x = { type = "string", optional = "yes" } }"#,
                "schema of 'x': 'optional' must be a boolean",
            ),
            (
                r#"{ x = { type = "string", default = {} } }"#,
                "schema of 'x': 'default' must be a scalar",
            ),
            (
                r#"{ x = { type = "object", properties = true } }"#,
                "schema of 'x': 'properties' must be a table",
            ),
            (
                r#"{ x = { type = "array", items = "string" } }"#,
                "schema of 'x': 'items' must be a table",
            ),
            (
                r#"{ x = { type = "object", additionalProperties = "yes" } }"#,
                "schema of 'x': 'additionalProperties' must be a boolean",
            ),
            (
                r#"{ x = { type = "array", maxItems = -1 } }"#,
                "schema of 'x': 'maxItems' must be a whole number >= 0",
            ),
            (
                r#"{ x = { type = "string", maxLength = 1.5 } }"#,
                "schema of 'x': 'maxLength' must be a whole number >= 0",
            ),
            (
                r#"{ x = { type = "string", minLength = -2 } }"#,
                "schema of 'x': 'minLength' must be a whole number >= 0",
            ),
            (
                r#"{ o = { type = "object", properties = { y = { type = "nope" } } } }"#,
                "schema of 'o.y': unknown type 'nope'",
            ),
            (
                r#"{ l = { type = "array", items = { type = "nope" } } }"#,
                "schema of 'l[]': unknown type 'nope'",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(params(src).err().as_deref(), Some(want), "{src}");
        }
        let bad_pattern = params(r#"{ x = { type = "string", pattern = "(" } }"#).unwrap_err();
        assert!(
            bad_pattern.starts_with("schema of 'x': bad pattern: "),
            "{bad_pattern}"
        );
        let not_a_table = params(r#"{ x = "string" }"#).unwrap_err();
        assert!(
            not_a_table.starts_with("schema of '': bad property: "),
            "{not_a_table}"
        );
        // A key that does not apply to the type is accepted and ignored.
        assert!(params(r#"{ x = { type = "string", minimum = 1, description = "d" } }"#).is_ok());
    }
}
