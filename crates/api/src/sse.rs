//! Server-sent-event framing that the strict azure parser accepts (CONTRACT.md A6): every event
//! is exactly `data: <compact JSON>\n\n`, LF only, no comments, no `event:`/`id:` lines, and the
//! stream ends with `data: [DONE]\n\n`.

use serde::Serialize;

/// The last event of every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Frames one JSON value as an event. `serde_json` writes compact JSON and escapes newlines
/// inside strings, so the payload is always one line.
pub fn event<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, value).expect("serializing a wire type cannot fail");
    out.extend_from_slice(b"\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_lf_only() {
        let e = event(&serde_json::json!({"a": "x\ny\r\n"}));
        assert_eq!(e, b"data: {\"a\":\"x\\ny\\r\\n\"}\n\n".to_vec());
    }
}
