//! A request body's top-level keys with typed getters whose errors name the key; shared by the
//! chat and the text-completions parsers.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The body's top-level keys, with typed getters whose errors name the key.
pub(crate) struct Fields(pub(crate) Map<String, Value>);

impl Fields {
    /// The value of a key; `null` reads as absent.
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A number, or a string holding one (some clients send `"0.5"`).
    pub(crate) fn number(&self, name: &str) -> Result<Option<f32>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64().map(|x| x as f32)),
            Some(Value::String(s)) => match s.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Some(x as f32)),
                _ => Err(ApiError::invalid_type(name, "a number")),
            },
            Some(_) => Err(ApiError::invalid_type(name, "a number")),
        }
    }

    /// A signed 64-bit integer.
    pub(crate) fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                None if n.is_u64() => Err(ApiError::invalid_value(
                    name,
                    format!("`{name}` must fit in a signed 64-bit integer, got {n}"),
                )),
                None => Err(ApiError::invalid_type(name, "an integer")),
            },
            Some(_) => Err(ApiError::invalid_type(name, "an integer")),
        }
    }

    /// A non-negative integer.
    pub(crate) fn count(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(u) = n.as_u64() {
                    Ok(Some(usize::try_from(u).unwrap_or(usize::MAX)))
                } else if n.is_i64() {
                    Err(ApiError::invalid_value(
                        name,
                        format!("`{name}` must not be negative, got {n}"),
                    ))
                } else {
                    Err(ApiError::invalid_type(name, "an integer"))
                }
            }
            Some(_) => Err(ApiError::invalid_type(name, "an integer")),
        }
    }

    /// A boolean.
    pub(crate) fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid_type(name, "a boolean")),
        }
    }
}
