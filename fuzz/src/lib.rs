//! Helpers shared by the fuzz targets: a readable input format and invariants on responses.
//!
//! Inputs are text-like so seed files are readable: the first line is a request line or a
//! query, then one `name: value` header per line. Values may hold any byte except `\n`;
//! headers that `http` refuses (bad names, CR, NUL...) are skipped, exactly as a server
//! would refuse them before the layer runs. `{k0}`..`{k9}` in a value is replaced by the
//! plaintext of fixture key 0..9, so the fuzzer reaches the hit path.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Splits `data` into its first line and the header lines after it.
pub fn split_lines(data: &[u8]) -> (&[u8], Vec<&[u8]>) {
    let mut lines = data.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    (first, lines.collect())
}

/// Replaces `{kN}` with `keys[N]` (left as is when there is no key N).
pub fn substitute(value: &[u8], keys: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i..].starts_with(b"{k") && i + 3 < value.len() && value[i + 3] == b'}' {
            let digit = value[i + 2];
            if digit.is_ascii_digit() {
                if let Some(key) = keys.get(usize::from(digit - b'0')) {
                    out.extend_from_slice(key.as_bytes());
                    i += 4;
                    continue;
                }
            }
        }
        out.push(value[i]);
        i += 1;
    }
    out
}

/// Builds a header map from `name: value` lines (one optional space after the colon is
/// dropped, any other whitespace is kept). Lines that `http` refuses are skipped.
pub fn headers(lines: &[&[u8]], keys: &[String]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(&substitute(value, keys)),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    map
}

/// Strips optional whitespace (SP, HTAB) at both ends, as RFC 9110 does.
pub fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Whether `needle` (non-empty) occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The documented codes of DESIGN §4 with their HTTP status and gRPC status.
pub const CODES: [(&str, u16, &str); 9] = [
    ("missing_credentials", 401, "16"),
    ("malformed_key", 401, "16"),
    ("invalid_key", 401, "16"),
    ("expired_key", 401, "16"),
    ("revoked_key", 401, "16"),
    ("ambiguous_credentials", 400, "3"),
    ("insufficient_scope", 403, "7"),
    ("rate_limited", 429, "8"),
    ("store_unavailable", 503, "14"),
];

/// Checks a problem+json body against the contract; returns its code.
///
/// # Panics
/// When the body is not `{"status", "code", "title", "detail"}` with a documented code whose
/// status is `status`.
pub fn check_problem(status: u16, content_type: Option<&HeaderValue>, body: &[u8]) -> String {
    assert_eq!(
        content_type.map(HeaderValue::as_bytes),
        Some(&b"application/problem+json"[..]),
        "a rejection must be problem+json"
    );
    let json: serde_json::Value = serde_json::from_slice(body).expect("problem body is JSON");
    let code = json["code"].as_str().expect("problem body has a code");
    assert_eq!(json["status"], status, "status field matches the status");
    assert!(json["title"].is_string() && json["detail"].is_string());
    code.to_owned()
}

/// The documented HTTP status of a layer code.
pub fn layer_status(code: &str) -> Option<u16> {
    CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, s, _)| *s)
}
