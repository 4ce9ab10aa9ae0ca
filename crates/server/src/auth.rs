//! API-key authentication: `Authorization: Bearer <key>` or `api-key: <key>` (the azure SDK
//! sends both, the openai SDK only the first), checked against every configured key in constant
//! time. Several keys can be valid at once so keys can be rotated without downtime.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use phi_api::ApiError;

use crate::http_error::HttpError;
use crate::state::AppState;

/// Middleware: lets the request through when no keys are configured or when a presented key
/// matches one; answers 401 otherwise.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.config().api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let presented = presented_keys(req.headers());
    if presented.is_empty() {
        return HttpError(ApiError::missing_api_key()).into_response();
    }
    // Every presented key is checked against every configured key, whatever matches, so the
    // time taken does not tell which key (or which header) was right.
    let ok = presented.iter().fold(false, |acc, p| acc | matches_any(keys, p));
    if ok {
        next.run(req).await
    } else {
        HttpError(ApiError::invalid_api_key()).into_response()
    }
}

/// The keys a request presents, from `Authorization: Bearer` and `api-key`.
fn presented_keys(headers: &HeaderMap) -> Vec<&[u8]> {
    let mut keys = Vec::new();
    for value in headers.get_all(axum::http::header::AUTHORIZATION) {
        let v = value.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            keys.push(v[7..].trim_ascii());
        }
    }
    for value in headers.get_all("api-key") {
        keys.push(value.as_bytes().trim_ascii());
    }
    keys.retain(|k| !k.is_empty());
    keys
}

/// Whether `given` equals one of `keys`, comparing against all of them.
pub fn matches_any(keys: &[String], given: &[u8]) -> bool {
    keys.iter().fold(false, |acc, k| acc | constant_time_eq(given, k.as_bytes()))
}

/// Byte equality whose running time depends only on the lengths, never on where the inputs
/// differ, so a client cannot find a key one byte at a time by timing 401s.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, &e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= usize::from(g ^ e);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(matches_any(&["a".into(), "bb".into()], b"bb"));
        assert!(!matches_any(&["a".into(), "bb".into()], b"b"));
    }

    #[test]
    fn reads_both_headers() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "bearer  k1".parse().unwrap());
        h.insert("api-key", "k2".parse().unwrap());
        assert_eq!(presented_keys(&h), vec![b"k1".as_slice(), b"k2".as_slice()]);
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic xyz".parse().unwrap());
        assert!(presented_keys(&h).is_empty());
    }
}
