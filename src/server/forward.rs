//! `/v1/auth`: forward auth for gateways that ask before they forward a request.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::AuthServer;
use crate::manage::http::error::ApiError;
use crate::principal::Principal;

/// The headers a gateway sends the original method in, in the order they are read.
const METHOD_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-forwarded-method"),
    HeaderName::from_static("x-original-method"),
];

/// The identity headers of an accepted request.
pub(super) const SUBJECT: HeaderName = HeaderName::from_static("x-keywarden-subject");
pub(super) const KEY_ID: HeaderName = HeaderName::from_static("x-keywarden-key-id");
pub(super) const COLLECTION: HeaderName = HeaderName::from_static("x-keywarden-collection");
pub(super) const SCOPES: HeaderName = HeaderName::from_static("x-keywarden-scopes");
/// The code of a rejection, for gateways that render their own error body.
pub(super) const CODE: HeaderName = HeaderName::from_static("x-keywarden-code");

pub(super) async fn forward_auth(State(server): State<AuthServer>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let method = match original_method(&parts.headers) {
        Ok(Some(method)) => method,
        Ok(None) => parts.method.clone(),
        Err(error) => return error.into_response(),
    };
    let client = server.client(&parts.headers, &parts.extensions);
    match server
        .layer
        .check_headers(&parts.headers, &method, client)
        .await
    {
        Ok((principal, status)) => {
            let mut headers = identity_headers(&principal);
            if let Some(status) = status {
                status.write_headers(&mut headers);
            }
            (StatusCode::OK, headers).into_response()
        }
        Err(rejection) => {
            let code = HeaderValue::from_static(rejection.kind().code());
            let mut response = rejection.into_response();
            response.headers_mut().insert(CODE, code);
            response
        }
    }
}

/// The method the gateway forwarded, if it says; a value that is not a method is a 400.
fn original_method(headers: &HeaderMap) -> Result<Option<Method>, ApiError> {
    let Some(value) = METHOD_HEADERS.iter().find_map(|name| headers.get(name)) else {
        return Ok(None);
    };
    Method::from_bytes(value.as_bytes().trim_ascii())
        .map(Some)
        .map_err(|_| ApiError::bad_request("the forwarded method is not an HTTP method"))
}

fn identity_headers(principal: &Principal) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(8);
    headers.insert(SUBJECT, header_text(principal.subject().as_bytes()));
    headers.insert(
        KEY_ID,
        HeaderValue::from_str(&principal.key_id().to_string())
            .expect("a UUID is a valid header value"),
    );
    headers.insert(COLLECTION, header_text(principal.collection().as_bytes()));
    headers.insert(SCOPES, header_text(principal.scopes().join(",").as_bytes()));
    headers
}

/// `text` as a header value: visible ASCII and spaces as they are, `%` and every other byte
/// percent-encoded, so a subject can neither break the header nor smuggle another one.
fn header_text(text: &[u8]) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(text.len());
    for &byte in text {
        if (byte == b' ' || byte.is_ascii_graphic()) && byte != b'%' {
            out.push(byte);
        } else {
            out.extend_from_slice(&[
                b'%',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]);
        }
    }
    HeaderValue::from_bytes(&out).expect("visible ASCII is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_encodes_what_a_header_cannot_carry() {
        assert_eq!(header_text(b"user 42"), "user 42");
        assert_eq!(header_text(b"a%b"), "a%25b");
        assert_eq!(header_text(b"x\r\nSet-Cookie: y"), "x%0D%0ASet-Cookie: y");
        assert_eq!(header_text("é".as_bytes()), "%C3%A9");
    }

    #[test]
    fn the_forwarded_method_is_read_from_either_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(original_method(&headers).unwrap(), None);
        headers.insert("x-original-method", HeaderValue::from_static("POST"));
        assert_eq!(original_method(&headers).unwrap(), Some(Method::POST));
        headers.insert("x-forwarded-method", HeaderValue::from_static("DELETE"));
        assert_eq!(original_method(&headers).unwrap(), Some(Method::DELETE));
        headers.insert(
            "x-forwarded-method",
            HeaderValue::from_static("NOT A METHOD"),
        );
        assert!(original_method(&headers).is_err());
    }
}
