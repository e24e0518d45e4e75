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
        Err(error) => {
            // Coded like every other rejection, for gateways that render their own body.
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(CODE, HeaderValue::from_static("invalid_request"));
            return response;
        }
    };
    // Every forwarded request costs 1 credit. Never a cost from the URL or a header: some
    // gateways pass the client's query (Caddy) or path (Envoy) into the check request, and
    // a client could then name its own price.
    let client = server.addresses(&parts.headers, &parts.extensions);
    match server
        .layer
        .check_headers_from(&parts.headers, &method, client, 1)
        .await
    {
        Ok((principal, quota)) => {
            let mut headers = identity_headers(&principal);
            quota.write_headers(&mut headers);
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

/// The method the gateway forwarded, if it says. Every value of both headers must name the
/// same method: a client may add one of them itself (nginx passes client headers into its
/// `auth_request` subrequest), so a second opinion is a 400, never a choice. A value that is
/// not a method is a 400 too.
fn original_method(headers: &HeaderMap) -> Result<Option<Method>, ApiError> {
    let mut found: Option<Method> = None;
    for name in &METHOD_HEADERS {
        for value in headers.get_all(name) {
            let method = Method::from_bytes(value.as_bytes().trim_ascii())
                .map_err(|_| ApiError::bad_request("the forwarded method is not an HTTP method"))?;
            match &found {
                Some(seen) if *seen != method => return Err(ApiError::bad_request(
                    "the forwarded method headers disagree (X-Forwarded-Method, X-Original-Method)",
                )),
                _ => found = Some(method),
            }
        }
    }
    Ok(found)
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
    let mut scopes = Vec::new();
    for (i, scope) in principal.scopes().iter().enumerate() {
        if i > 0 {
            scopes.push(b',');
        }
        scopes.extend_from_slice(header_text(scope.as_bytes()).as_bytes());
    }
    headers.insert(
        SCOPES,
        HeaderValue::from_bytes(&scopes).expect("encoded scopes are a valid header value"),
    );
    headers
}

/// `text` as a header value: visible ASCII as it is; `%`, `,` (the scopes' separator), space
/// and every other byte percent-encoded, so a value can neither break the header, smuggle
/// another one, add a scope to the list, nor lose a trailing space to a gateway's trimming.
fn header_text(text: &[u8]) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(text.len());
    for &byte in text {
        if byte.is_ascii_graphic() && byte != b'%' && byte != b',' {
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
        assert_eq!(header_text(b"user 42"), "user%2042");
        assert_eq!(header_text(b"alice "), "alice%20");
        assert_eq!(header_text(b"a:read,b:admin"), "a:read%2Cb:admin");
        assert_eq!(header_text(b"a%b"), "a%25b");
        assert_eq!(header_text(b"x\r\nSet-Cookie: y"), "x%0D%0ASet-Cookie:%20y");
        assert_eq!(header_text("é".as_bytes()), "%C3%A9");
    }

    /// A scope holding the separator cannot add a scope to the list the upstream splits.
    #[test]
    fn a_comma_in_a_scope_stays_inside_that_scope() {
        let principal = Principal::for_tests(&["articles:read,billing:admin", "keys:self"]);
        let headers = identity_headers(&principal);
        assert_eq!(headers[SCOPES], "articles:read%2Cbilling:admin,keys:self");
        assert_eq!(headers[SCOPES].to_str().unwrap().split(',').count(), 2);
    }

    #[test]
    fn the_forwarded_method_is_read_from_either_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(original_method(&headers).unwrap(), None);
        headers.insert("x-original-method", HeaderValue::from_static("POST"));
        assert_eq!(original_method(&headers).unwrap(), Some(Method::POST));
        // A second header that disagrees (a client can add one) is refused, not chosen.
        headers.insert("x-forwarded-method", HeaderValue::from_static("GET"));
        assert!(original_method(&headers).is_err());
        headers.insert("x-forwarded-method", HeaderValue::from_static("POST"));
        assert_eq!(original_method(&headers).unwrap(), Some(Method::POST));
        headers.append("x-original-method", HeaderValue::from_static("GET"));
        assert!(original_method(&headers).is_err());
        headers.remove("x-original-method");
        headers.insert(
            "x-forwarded-method",
            HeaderValue::from_static("NOT A METHOD"),
        );
        assert!(original_method(&headers).is_err());
    }
}
