//! The `extra-parameters` request header of the Azure AI Model Inference API: what to do with
//! body keys the API does not define.
//!
//! The azure SDK sends `pass-through` whenever the caller uses `model_extras` (that is how
//! `logprobs` reaches the server), and never sends the header otherwise; the default (`error`)
//! rejects unknown keys so that a typo in a parameter name is not silently ignored.

use crate::error::ApiError;

/// Name of the header.
pub const HEADER: &str = "extra-parameters";

/// Policy for body keys the API does not define.
///
/// Exists so that the parser can apply the policy without knowing about HTTP headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExtraParameters {
    /// Reject the request with 400 naming the unknown keys (the default).
    #[default]
    Error,
    /// Remove unknown keys and go on.
    Drop,
    /// Hand unknown keys to the model. This server's model takes none, so they are ignored
    /// after being accepted.
    PassThrough,
}

impl ExtraParameters {
    /// Parses the header value: absent means `error`; values other than `error`, `drop` and
    /// `pass-through` (matched case-insensitively, surrounding spaces ignored) are a 400.
    pub fn from_header(value: Option<&str>) -> Result<Self, ApiError> {
        let Some(raw) = value else { return Ok(Self::Error) };
        match raw.trim().to_ascii_lowercase().as_str() {
            "error" => Ok(Self::Error),
            "drop" => Ok(Self::Drop),
            "pass-through" => Ok(Self::PassThrough),
            _ => Err(ApiError::invalid_extra_parameters_header(raw)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_values_and_rejects_others() {
        assert_eq!(ExtraParameters::from_header(None).unwrap(), ExtraParameters::Error);
        assert_eq!(ExtraParameters::from_header(Some("error")).unwrap(), ExtraParameters::Error);
        assert_eq!(ExtraParameters::from_header(Some("DROP")).unwrap(), ExtraParameters::Drop);
        assert_eq!(
            ExtraParameters::from_header(Some(" pass-through ")).unwrap(),
            ExtraParameters::PassThrough
        );
        let e = ExtraParameters::from_header(Some("ignore")).unwrap_err();
        assert_eq!((e.status, e.code), (400, "invalid_extra_parameters"));
    }
}
