//! Reading a command's `arguments` object with QEMU's error wording.
//!
//! QEMU's QAPI input visitor reads members in schema order and reports the
//! first problem it meets: "Parameter 'name' is missing", "Invalid parameter
//! type for 'name', expected: string", "Parameter 'granularity' expects
//! uint64", and, once every known member has been read, "Parameter 'x' is
//! unexpected". [`Args`] reproduces that: a handler takes its members in
//! schema order and calls [`Args::finish`] last. Nested members are named as
//! QEMU names them (`bitmaps[0].name`).

use super::error::QmpError;
use serde_json::{Map, Value};

fn invalid_type(path: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{path}', expected: {expected}"
    ))
}

/// Converts `v` to a string, or QEMU's type error for member `path`.
pub fn value_str(path: &str, v: Value) -> Result<String, QmpError> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(invalid_type(path, "string")),
    }
}

/// Converts `v` to a boolean, or QEMU's type error for member `path`.
pub fn value_bool(path: &str, v: Value) -> Result<bool, QmpError> {
    match v {
        Value::Bool(b) => Ok(b),
        _ => Err(invalid_type(path, "boolean")),
    }
}

/// Converts `v` to QAPI `int` (int64), as QEMU does.
pub fn value_i64(path: &str, v: &Value) -> Result<i64, QmpError> {
    v.as_i64().ok_or_else(|| invalid_type(path, "integer"))
}

/// Converts `v` to QAPI `uint64`. Like QEMU, a negative integer is
/// accepted and reinterpreted (QEMU keeps this for backward compatibility);
/// handlers must range-check what they get.
pub fn value_u64(path: &str, v: &Value) -> Result<u64, QmpError> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    if let Some(n) = v.as_i64() {
        return Ok(n as u64);
    }
    Err(QmpError::generic(format!(
        "Parameter '{path}' expects uint64"
    )))
}

/// Converts `v` to QAPI `uint32`, with QEMU's two-step errors (not an
/// integer: "expects uint64"; out of range: "expects uint32_t").
pub fn value_u32(path: &str, v: &Value) -> Result<u32, QmpError> {
    let n = value_u64(path, v)?;
    u32::try_from(n).map_err(|_| QmpError::generic(format!("Parameter '{path}' expects uint32_t")))
}

/// Converts `v` to one of the enum's `values`, with QEMU's errors.
pub fn value_enum(path: &str, v: Value, values: &[&str]) -> Result<String, QmpError> {
    let s = value_str(path, v)?;
    if values.contains(&s.as_str()) {
        Ok(s)
    } else {
        Err(QmpError::generic(format!(
            "Parameter '{path}' does not accept value '{s}'"
        )))
    }
}

/// The `arguments` of one command (or a nested object inside them),
/// consumed member by member.
#[derive(Debug, Default)]
pub struct Args {
    map: Map<String, Value>,
    prefix: String,
}

impl Args {
    /// Wraps a top-level `arguments` object.
    pub fn new(map: Map<String, Value>) -> Args {
        Args {
            map,
            prefix: String::new(),
        }
    }

    /// Wraps a nested object found at `path` (e.g. `bitmaps[0]`), or
    /// returns QEMU's type error if `v` is not an object.
    pub fn nested(path: &str, v: Value) -> Result<Args, QmpError> {
        match v {
            Value::Object(map) => Ok(Args {
                map,
                prefix: path.to_string(),
            }),
            _ => Err(invalid_type(path, "object")),
        }
    }

    /// QEMU's full name of member `name` (`prefix.name`).
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Removes and returns member `name` if present.
    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name)
    }

    /// Removes and returns member `name`, or "Parameter 'name' is missing".
    pub fn required(&mut self, name: &str) -> Result<Value, QmpError> {
        self.map
            .remove(name)
            .ok_or_else(|| QmpError::generic(format!("Parameter '{}' is missing", self.path(name))))
    }

    /// A required string member.
    pub fn req_str(&mut self, name: &str) -> Result<String, QmpError> {
        let v = self.required(name)?;
        value_str(&self.path(name), v)
    }

    /// An optional string member.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        self.take(name)
            .map(|v| value_str(&self.path(name), v))
            .transpose()
    }

    /// A required boolean member.
    pub fn req_bool(&mut self, name: &str) -> Result<bool, QmpError> {
        let v = self.required(name)?;
        value_bool(&self.path(name), v)
    }

    /// An optional boolean member.
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        self.take(name)
            .map(|v| value_bool(&self.path(name), v))
            .transpose()
    }

    /// A required `int` member.
    pub fn req_i64(&mut self, name: &str) -> Result<i64, QmpError> {
        let v = self.required(name)?;
        value_i64(&self.path(name), &v)
    }

    /// An optional `int` member.
    pub fn opt_i64(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        self.take(name)
            .map(|v| value_i64(&self.path(name), &v))
            .transpose()
    }

    /// A required `uint64` member.
    pub fn req_u64(&mut self, name: &str) -> Result<u64, QmpError> {
        let v = self.required(name)?;
        value_u64(&self.path(name), &v)
    }

    /// An optional `uint64` member.
    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        self.take(name)
            .map(|v| value_u64(&self.path(name), &v))
            .transpose()
    }

    /// An optional `uint32` member.
    pub fn opt_u32(&mut self, name: &str) -> Result<Option<u32>, QmpError> {
        self.take(name)
            .map(|v| value_u32(&self.path(name), &v))
            .transpose()
    }

    /// A required enum member restricted to `values`.
    pub fn req_enum(&mut self, name: &str, values: &[&str]) -> Result<String, QmpError> {
        let v = self.required(name)?;
        value_enum(&self.path(name), v, values)
    }

    /// An optional enum member restricted to `values`.
    pub fn opt_enum(&mut self, name: &str, values: &[&str]) -> Result<Option<String>, QmpError> {
        self.take(name)
            .map(|v| value_enum(&self.path(name), v, values))
            .transpose()
    }

    /// A required list member: its elements with their QEMU names
    /// (`name[0]`, `name[1]`, ...), for the caller to convert.
    pub fn req_list(&mut self, name: &str) -> Result<Vec<(String, Value)>, QmpError> {
        let v = self.required(name)?;
        list_items(&self.path(name), v)
    }

    /// An optional list member, as [`Args::req_list`].
    pub fn opt_list(&mut self, name: &str) -> Result<Option<Vec<(String, Value)>>, QmpError> {
        self.take(name)
            .map(|v| list_items(&self.path(name), v))
            .transpose()
    }

    /// Ends reading: any member not taken is "Parameter 'x' is unexpected".
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(key) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.path(key)
            ))),
            None => Ok(()),
        }
    }
}

fn list_items(path: &str, v: Value) -> Result<Vec<(String, Value)>, QmpError> {
    match v {
        Value::Array(items) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{path}[{i}]"), v))
            .collect()),
        _ => Err(invalid_type(path, "array")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn qemu_wording() {
        let mut a = args(json!({"name": 5, "g": "x", "h": -1, "i": 1.5, "b": "yes"}));
        assert_eq!(
            a.req_str("name").unwrap_err().desc,
            "Invalid parameter type for 'name', expected: string"
        );
        assert_eq!(
            a.opt_u32("g").unwrap_err().desc,
            "Parameter 'g' expects uint64"
        );
        assert_eq!(
            a.opt_u32("h").unwrap_err().desc,
            "Parameter 'h' expects uint32_t"
        );
        assert_eq!(
            a.opt_u64("i").unwrap_err().desc,
            "Parameter 'i' expects uint64"
        );
        assert_eq!(
            a.opt_bool("b").unwrap_err().desc,
            "Invalid parameter type for 'b', expected: boolean"
        );
        assert_eq!(
            a.req_str("node").unwrap_err().desc,
            "Parameter 'node' is missing"
        );
        a.finish().unwrap();
    }

    #[test]
    fn nested_names_and_unexpected() {
        let mut a = args(json!({"bitmaps": [{"node": "d"}], "extra": 1}));
        let items = a.req_list("bitmaps").unwrap();
        let (path, v) = items.into_iter().next().unwrap();
        let mut inner = Args::nested(&path, v).unwrap();
        assert_eq!(inner.req_str("node").unwrap(), "d");
        assert_eq!(
            inner.req_str("name").unwrap_err().desc,
            "Parameter 'bitmaps[0].name' is missing"
        );
        assert_eq!(
            a.finish().unwrap_err().desc,
            "Parameter 'extra' is unexpected"
        );
    }

    #[test]
    fn enums() {
        let mut a = args(json!({"sync": "fast", "mode": 3}));
        assert_eq!(
            a.opt_enum("sync", &["full", "top"]).unwrap_err().desc,
            "Parameter 'sync' does not accept value 'fast'"
        );
        assert_eq!(
            a.opt_enum("mode", &["existing"]).unwrap_err().desc,
            "Invalid parameter type for 'mode', expected: string"
        );
    }
}
