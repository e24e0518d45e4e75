//! Byte-level extraction of an API key from request headers (and, if enabled, the query).
//!
//! Accepted forms:
//! - `Authorization: <collection-slug> API-Key <key>` (Payload CMS): the slug must name a
//!   configured collection exactly; `API-Key` is matched ASCII-case-insensitively.
//! - `Authorization: Bearer <key>`: the scheme is case-insensitive (RFC 9110).
//! - `X-Api-Key: <key>` and any extra configured header names.
//! - A query parameter, only when configured.
//!
//! Several credentials that disagree, or a repeated `Authorization` or key header, are
//! ambiguous. Parsing works on header bytes and does not allocate.
//!
//! ```
//! use http::{HeaderMap, HeaderValue};
//! use keywarden::{credential::CredentialExtractor, credential::CredentialSource};
//!
//! let extractor = CredentialExtractor::new(["users", "teams"]);
//! let mut headers = HeaderMap::new();
//! headers.insert("authorization", HeaderValue::from_static("users API-Key kw_live_abc"));
//! let credential = extractor.extract(&headers, None).unwrap().unwrap();
//! assert_eq!(credential.key(), b"kw_live_abc");
//! assert_eq!(credential.source(), CredentialSource::Collection(0));
//! ```

use std::fmt;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::key::{all_visible_ascii, KeyFormat, MAX_KEY_LEN};

/// The default API-key header.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Where a credential was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialSource {
    /// `Authorization: <slug> API-Key <key>`; the index of the collection in the extractor.
    Collection(usize),
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// An API-key header; the index of the header name in the extractor.
    Header(usize),
    /// The configured query parameter.
    Query,
}

/// A credential found in a request. Borrows the request; `Debug` redacts the key.
#[derive(Clone, Copy)]
pub struct Credential<'a> {
    key: &'a [u8],
    source: CredentialSource,
    from_authorization: bool,
    headers: HeaderSources,
}

/// Which configured API-key headers carried a credential (every one present did, or
/// extraction would have failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderSources {
    /// None of them.
    None,
    /// Only the header at this index of the extractor's names.
    One(usize),
    /// More than one.
    Several,
}

impl<'a> Credential<'a> {
    /// The key bytes (visible ASCII, 1 to 512 bytes).
    pub fn key(&self) -> &'a [u8] {
        self.key
    }

    /// Where it was found. When the same key arrived in several places, the
    /// `<slug> API-Key` form wins because it binds a collection.
    pub fn source(&self) -> CredentialSource {
        self.source
    }

    /// Whether the `Authorization` header carried this credential.
    pub fn from_authorization(&self) -> bool {
        self.from_authorization
    }

    /// Which configured API-key headers carried this credential.
    pub(crate) fn header_sources(&self) -> HeaderSources {
        self.headers
    }
}

impl fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("key", &"[redacted]")
            .field("source", &self.source)
            .finish()
    }
}

/// Why extraction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// Several credentials that disagree, or a repeated credential header.
    #[error("several different credentials, or a repeated credential header")]
    Ambiguous,
    /// A credential that cannot be a key.
    #[error("{0}")]
    Malformed(&'static str),
    /// `<slug> API-Key <key>` with a slug that is not a configured collection.
    #[error("unknown collection in the Authorization header")]
    UnknownCollection,
}

/// A predicate claiming `Bearer` tokens for a foreign collection.
type BearerClaim = std::sync::Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Finds the credential in a request according to configuration.
#[derive(Clone)]
pub struct CredentialExtractor {
    collections: Vec<Box<str>>,
    headers: Vec<HeaderName>,
    query_param: Option<Box<str>>,
    foreign_bearer: Option<KeyFormat>,
    /// A foreign `Bearer` token (see `foreign_bearer`) counts only when nothing else does.
    bearer_fallback: bool,
    /// Collections whose `<slug> API-Key <key>` form is matched as Payload CMS matches it.
    exact: Vec<usize>,
    /// Bearer tokens claimed in optional mode besides keywarden's own format.
    bearer_claims: Vec<BearerClaim>,
    /// Whether one pass over the headers can find the configured ones
    /// ([`CredentialExtractor::scans`]): at most [`SCANNED_NAMES`] of them, none of them
    /// `Authorization`.
    scannable: bool,
}

impl std::fmt::Debug for CredentialExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialExtractor")
            .field("collections", &self.collections)
            .field("headers", &self.headers)
            .field("query_param", &self.query_param)
            .field("foreign_bearer", &self.foreign_bearer)
            .field("bearer_fallback", &self.bearer_fallback)
            .field("exact", &self.exact)
            .field("bearer_claims", &self.bearer_claims.len())
            .finish()
    }
}

impl CredentialExtractor {
    /// An extractor accepting these collection slugs, `Bearer`, and `X-Api-Key`.
    pub fn new<I, S>(collections: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            collections: collections.into_iter().map(|s| s.as_ref().into()).collect(),
            headers: vec![X_API_KEY],
            query_param: None,
            foreign_bearer: None,
            bearer_fallback: false,
            exact: Vec::new(),
            bearer_claims: Vec::new(),
            scannable: true,
        }
    }

    /// Matches the collection at `index` the way Payload CMS does: the value must start
    /// byte-exactly with `<slug> API-Key ` (`API-Key` case-sensitive, one space on each side),
    /// and the rest of the value is the key. Any other spelling of the form is not a
    /// credential (Payload ignores it too).
    #[must_use]
    pub fn exact_api_key_form(mut self, index: usize) -> Self {
        if !self.exact.contains(&index) {
            self.exact.push(index);
        }
        self
    }

    /// With [`ignore_foreign_bearer`](Self::ignore_foreign_bearer) or
    /// [`foreign_bearer_as_fallback`](Self::foreign_bearer_as_fallback), also claims `Bearer`
    /// tokens for which `claims` is true (for example Strapi API tokens).
    #[must_use]
    pub fn claim_bearer(mut self, claims: impl Fn(&[u8]) -> bool + Send + Sync + 'static) -> Self {
        self.bearer_claims.push(std::sync::Arc::new(claims));
        self
    }

    /// Also reads the key from this header (for example `X-Stack-Api-Key`).
    #[must_use]
    pub fn header(mut self, name: HeaderName) -> Self {
        if !self.headers.contains(&name) {
            self.headers.push(name);
        }
        self.scannable =
            self.headers.len() <= SCANNED_NAMES && !self.headers.contains(&AUTHORIZATION);
        self
    }

    /// Also reads the key from this query parameter. Off by default: query strings end up in
    /// access logs and browser history.
    #[must_use]
    pub fn query_param(mut self, name: impl Into<String>) -> Self {
        self.query_param = Some(name.into().into_boxed_str());
        self
    }

    /// Leaves `Bearer` tokens that `format` does not claim (no keywarden prefix) to another
    /// authentication layer: they are ignored instead of extracted.
    #[must_use]
    pub fn ignore_foreign_bearer(mut self, format: KeyFormat) -> Self {
        self.foreign_bearer = Some(format);
        self.bearer_fallback = false;
        self
    }

    /// A `Bearer` token that `format` does not claim (no keywarden prefix, and no
    /// [`claim_bearer`](Self::claim_bearer) predicate claims it) is the credential only when
    /// the request carries no other: beside an `X-Api-Key` (or `<slug> API-Key`) key it
    /// belongs to another authentication layer (a JWT) and is ignored, not ambiguous.
    #[must_use]
    pub fn foreign_bearer_as_fallback(mut self, format: KeyFormat) -> Self {
        self.foreign_bearer = Some(format);
        self.bearer_fallback = true;
        self
    }

    /// The configured collection slugs.
    pub fn collections(&self) -> &[Box<str>] {
        &self.collections
    }

    /// The configured API-key header names.
    pub fn header_names(&self) -> &[HeaderName] {
        &self.headers
    }

    /// Extracts the request's credential, if any.
    ///
    /// # Errors
    /// [`CredentialError`] for ambiguous, malformed or unknown-collection credentials.
    pub fn extract<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Result<Option<Credential<'a>>, CredentialError> {
        if self.scans(headers) {
            let found = self.scan(headers.iter());
            self.extract_from(found.authorization, |index| found.named[index], query)
        } else {
            self.extract_by_lookup(headers, query)
        }
    }

    /// [`extract`](Self::extract) with a hashed lookup of each credential header: for maps
    /// too large to [`scan`](Self::scan), or more configured names than it tracks.
    fn extract_by_lookup<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Result<Option<Credential<'a>>, CredentialError> {
        self.extract_from(
            Seen::all(headers.get_all(AUTHORIZATION)),
            |index| Seen::all(headers.get_all(&self.headers[index])),
            query,
        )
    }

    /// Extracts the credential (no query parameter) and marks the headers that carried it
    /// sensitive, in one pass over the headers; `then` sees the extraction's result. `None`
    /// (nothing done) when that pass does not apply: a query parameter is configured, the
    /// map is large, or more API-key header names are configured than one pass tracks.
    pub(crate) fn extract_marking<R>(
        &self,
        headers: &mut HeaderMap,
        then: impl FnOnce(Result<Option<Credential<'_>>, CredentialError>) -> R,
    ) -> Option<R> {
        if self.query_param.is_some() || !self.scans(headers) {
            return None;
        }
        let mut found = self.scan(headers.iter_mut());
        let (result, carried, from_authorization) = {
            let extracted = self.extract_from(
                found.authorization.shared(),
                |i| found.named[i].shared(),
                None,
            );
            let (carried, from_authorization) = match &extracted {
                Ok(Some(credential)) => (true, credential.from_authorization),
                _ => (false, false),
            };
            (then(extracted), carried, from_authorization)
        };
        // Every configured header present carried the credential (else extraction failed).
        if carried {
            for value in &mut found.named {
                value.mark_sensitive();
            }
            if from_authorization {
                found.authorization.mark_sensitive();
            }
        }
        Some(result)
    }

    /// Whether one pass over `headers` ([`scan`](Self::scan)) finds the credential headers,
    /// and cheaper than a hashed lookup of each: up to [`SCAN_LIMIT`] values, up to
    /// [`SCANNED_NAMES`] configured API-key headers, none of them `Authorization` (which
    /// the pass reads as itself only).
    fn scans(&self, headers: &HeaderMap) -> bool {
        self.scannable && headers.len() <= SCAN_LIMIT
    }

    /// One pass over the request's header values: the `Authorization` values and those of
    /// each configured API-key header (see [`scans`](Self::scans)).
    fn scan<'a, V>(
        &self,
        values: impl Iterator<Item = (&'a HeaderName, V)>,
    ) -> CredentialHeaders<V> {
        let mut found = CredentialHeaders {
            authorization: Seen::Absent,
            named: std::array::from_fn(|_| Seen::Absent),
        };
        for (name, value) in values {
            if *name == AUTHORIZATION {
                found.authorization.add(value);
            } else if let Some(index) = self.headers.iter().position(|n| n == name) {
                found.named[index].add(value);
            }
        }
        found
    }

    /// The extraction proper, from the values of `Authorization` and of each configured
    /// API-key header (`named(index)`), however they were found.
    fn extract_from<'a>(
        &self,
        authorization: Seen<&'a HeaderValue>,
        named: impl Fn(usize) -> Seen<&'a HeaderValue>,
        query: Option<&'a str>,
    ) -> Result<Option<Credential<'a>>, CredentialError> {
        let mut found: Option<Credential<'a>> = None;
        let mut fallback: Option<&'a [u8]> = None;

        match authorization {
            Seen::Absent => {}
            Seen::Repeated => return Err(CredentialError::Ambiguous),
            Seen::Once(value) => match self.parse_authorization(value)? {
                Authorization::Credential(credential) => merge(&mut found, credential)?,
                Authorization::ForeignBearer(token) => fallback = Some(token),
                Authorization::None => {}
            },
        }

        for index in 0..self.headers.len() {
            let value = match named(index) {
                Seen::Absent => continue,
                Seen::Repeated => return Err(CredentialError::Ambiguous),
                Seen::Once(value) => value,
            };
            let key = validate(trim_ows(value.as_bytes()))?;
            merge(
                &mut found,
                Credential {
                    key,
                    source: CredentialSource::Header(index),
                    from_authorization: false,
                    headers: HeaderSources::One(index),
                },
            )?;
        }

        if let (Some(param), Some(query)) = (&self.query_param, query) {
            if let Some(key) = find_query_param(query, param)? {
                let key = validate(key)?;
                merge(
                    &mut found,
                    Credential {
                        key,
                        source: CredentialSource::Query,
                        from_authorization: false,
                        headers: HeaderSources::None,
                    },
                )?;
            }
        }
        if let (None, Some(token)) = (&found, fallback) {
            found = Some(Credential {
                key: validate(token)?,
                source: CredentialSource::Bearer,
                from_authorization: true,
                headers: HeaderSources::None,
            });
        }
        Ok(found)
    }

    fn parse_authorization<'a>(
        &self,
        value: &'a HeaderValue,
    ) -> Result<Authorization<'a>, CredentialError> {
        let value = trim_ows(value.as_bytes());
        for &index in &self.exact {
            let slug = self.collections[index].as_bytes();
            if let Some(key) = value
                .strip_prefix(slug)
                .and_then(|rest| rest.strip_prefix(b" API-Key "))
            {
                return Ok(Authorization::Credential(Credential {
                    key: validate(key)?,
                    source: CredentialSource::Collection(index),
                    from_authorization: true,
                    headers: HeaderSources::None,
                }));
            }
        }
        let Some((scheme, rest)) = split_word(value) else {
            if value.eq_ignore_ascii_case(b"bearer") {
                return Err(CredentialError::Malformed("empty Bearer token"));
            }
            return Ok(Authorization::None);
        };
        if scheme.eq_ignore_ascii_case(b"bearer") {
            if let Some(format) = &self.foreign_bearer {
                if !format.claims(rest) && !self.bearer_claims.iter().any(|claims| claims(rest)) {
                    return Ok(if self.bearer_fallback {
                        Authorization::ForeignBearer(rest)
                    } else {
                        Authorization::None
                    });
                }
            }
            return Ok(Authorization::Credential(Credential {
                key: validate(rest)?,
                source: CredentialSource::Bearer,
                from_authorization: true,
                headers: HeaderSources::None,
            }));
        }
        let Some((word, key)) = split_word(rest) else {
            if rest.eq_ignore_ascii_case(b"api-key") {
                return Err(CredentialError::Malformed("empty key after API-Key"));
            }
            return Ok(Authorization::None);
        };
        if !word.eq_ignore_ascii_case(b"api-key") {
            return Ok(Authorization::None);
        }
        let index = self
            .collections
            .iter()
            .position(|slug| slug.as_bytes() == scheme)
            .ok_or(CredentialError::UnknownCollection)?;
        if self.exact.contains(&index) {
            // Not Payload's exact spelling of its own form: Payload would not read it either.
            return Ok(Authorization::None);
        }
        Ok(Authorization::Credential(Credential {
            key: validate(key)?,
            source: CredentialSource::Collection(index),
            from_authorization: true,
            headers: HeaderSources::None,
        }))
    }
}

/// What the `Authorization` header holds.
enum Authorization<'a> {
    Credential(Credential<'a>),
    /// A `Bearer` token that is not a keywarden key, kept in case nothing else is.
    ForeignBearer(&'a [u8]),
    None,
}

/// Configured API-key header names one pass over the request's headers tracks; with more,
/// each credential header is looked up by hash.
const SCANNED_NAMES: usize = 4;

/// Header values up to which one pass comparing every name replaces the hashed lookups (two
/// to find the credential, one to mark it). Measured with `examples/hit_profile.rs`
/// (`HIT_PROFILE_HEADERS`) against the lookups: ≈ 330 fewer instructions per request up to
/// 5 values, no difference beyond callgrind's run-to-run spread from 7 to 17; the pass costs
/// more per value, so past that the lookups win.
const SCAN_LIMIT: usize = 16;

/// The values of one credential header, as far as extraction cares.
#[derive(Clone, Copy)]
enum Seen<V> {
    Absent,
    Once(V),
    /// More than one value: ambiguous.
    Repeated,
}

impl<V> Seen<V> {
    fn add(&mut self, value: V) {
        *self = match self {
            Seen::Absent => Seen::Once(value),
            _ => Seen::Repeated,
        };
    }
}

impl<'a> Seen<&'a HeaderValue> {
    fn all(values: http::header::GetAll<'a, HeaderValue>) -> Self {
        let mut seen = Seen::Absent;
        for value in values {
            if matches!(seen, Seen::Repeated) {
                break;
            }
            seen.add(value);
        }
        seen
    }
}

impl Seen<&mut HeaderValue> {
    fn shared(&self) -> Seen<&HeaderValue> {
        match self {
            Seen::Absent => Seen::Absent,
            Seen::Once(value) => Seen::Once(&**value),
            Seen::Repeated => Seen::Repeated,
        }
    }

    fn mark_sensitive(&mut self) {
        if let Seen::Once(value) = self {
            value.set_sensitive(true);
        }
    }
}

/// What one pass over the request's headers found: `Authorization`, and each configured
/// API-key header by its index.
struct CredentialHeaders<V> {
    authorization: Seen<V>,
    named: [Seen<V>; SCANNED_NAMES],
}

fn merge<'a>(
    found: &mut Option<Credential<'a>>,
    next: Credential<'a>,
) -> Result<(), CredentialError> {
    match found {
        None => *found = Some(next),
        Some(existing) => {
            if existing.key != next.key {
                return Err(CredentialError::Ambiguous);
            }
            existing.from_authorization |= next.from_authorization;
            existing.headers = match (existing.headers, next.headers) {
                (HeaderSources::None, other) | (other, HeaderSources::None) => other,
                _ => HeaderSources::Several,
            };
            if matches!(next.source, CredentialSource::Collection(_)) {
                existing.source = next.source;
            }
        }
    }
    Ok(())
}

fn validate(key: &[u8]) -> Result<&[u8], CredentialError> {
    if key.is_empty() {
        return Err(CredentialError::Malformed("empty credential"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(CredentialError::Malformed("credential too long"));
    }
    if !all_visible_ascii(key) {
        return Err(CredentialError::Malformed(
            "credential contains whitespace, control or non-ASCII bytes",
        ));
    }
    Ok(key)
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Splits `word 1*SP rest`; `None` when there is no space or nothing after it.
fn split_word(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (word, mut rest) = value.split_at(space);
    while let [b' ', tail @ ..] = rest {
        rest = tail;
    }
    (!rest.is_empty() && !word.is_empty()).then_some((word, rest))
}

fn find_query_param<'a>(query: &'a str, name: &str) -> Result<Option<&'a [u8]>, CredentialError> {
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            if found.is_some() {
                return Err(CredentialError::Ambiguous);
            }
            found = Some(value.as_bytes());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "kw_live_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklm";
    const OTHER: &str = "kw_live_zzzz456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklm";

    fn extractor() -> CredentialExtractor {
        CredentialExtractor::new(["users", "teams"])
            .header(HeaderName::from_static("x-stack-api-key"))
            .query_param("api_key")
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn extract(
        pairs: &[(&str, &[u8])],
    ) -> Result<Option<(Vec<u8>, CredentialSource)>, CredentialError> {
        extractor()
            .extract(&headers(pairs), None)
            .map(|c| c.map(|c| (c.key().to_vec(), c.source())))
    }

    #[test]
    fn payload_form_binds_the_collection() {
        let got = extract(&[("authorization", format!("teams API-Key {KEY}").as_bytes())]).unwrap();
        assert_eq!(
            got,
            Some((KEY.as_bytes().to_vec(), CredentialSource::Collection(1)))
        );
        let got =
            extract(&[("authorization", format!("users api-key  {KEY}").as_bytes())]).unwrap();
        assert_eq!(got.unwrap().1, CredentialSource::Collection(0));
    }

    #[test]
    fn payload_form_slug_is_exact() {
        for slug in ["Users", "user", "admins", "users\u{0}"] {
            let value = format!("{slug} API-Key {KEY}");
            if let Ok(v) = HeaderValue::from_str(&value) {
                let mut map = HeaderMap::new();
                map.insert(AUTHORIZATION, v);
                assert_eq!(
                    extractor().extract(&map, None).unwrap_err(),
                    CredentialError::UnknownCollection,
                    "{slug}"
                );
            }
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let got = extract(&[("authorization", format!("{scheme} {KEY}").as_bytes())]).unwrap();
            assert_eq!(
                got,
                Some((KEY.as_bytes().to_vec(), CredentialSource::Bearer)),
                "{scheme}"
            );
        }
    }

    #[test]
    fn api_key_headers() {
        let got = extract(&[("x-api-key", KEY.as_bytes())]).unwrap();
        assert_eq!(got.unwrap().1, CredentialSource::Header(0));
        let got = extract(&[("x-stack-api-key", KEY.as_bytes())]).unwrap();
        assert_eq!(got.unwrap().1, CredentialSource::Header(1));
        let got = extract(&[("x-api-key", format!("  {KEY}\t").as_bytes())]).unwrap();
        assert_eq!(got.unwrap().0, KEY.as_bytes());
    }

    #[test]
    fn no_credential_and_foreign_schemes() {
        assert_eq!(extract(&[]).unwrap(), None);
        assert_eq!(
            extract(&[("authorization", b"Basic dXNlcjpwYXNz")]).unwrap(),
            None
        );
        assert_eq!(extract(&[("authorization", b"Digest")]).unwrap(), None);
        assert_eq!(extract(&[("authorization", b"Bearer\tkey")]).unwrap(), None);
        assert_eq!(extract(&[("cookie", b"x-api-key=abc")]).unwrap(), None);
    }

    #[test]
    fn malformed_values() {
        let cases: &[&[u8]] = &[b"Bearer", b"bearer   ", b"users API-Key", b"Bearer a b"];
        for value in cases {
            assert!(
                matches!(
                    extract(&[("authorization", value)]),
                    Err(CredentialError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        assert!(matches!(
            extract(&[("x-api-key", b"")]),
            Err(CredentialError::Malformed(_))
        ));
        assert!(matches!(
            extract(&[("x-api-key", b"a\xffb")]),
            Err(CredentialError::Malformed(_))
        ));
        assert!(matches!(
            extract(&[("x-api-key", b"a b")]),
            Err(CredentialError::Malformed(_))
        ));
        let long = vec![b'a'; MAX_KEY_LEN + 1];
        assert!(matches!(
            extract(&[("x-api-key", &long)]),
            Err(CredentialError::Malformed(_))
        ));
        assert!(extract(&[("x-api-key", &long[..MAX_KEY_LEN])])
            .unwrap()
            .is_some());
    }

    #[test]
    fn ambiguity() {
        let bearer = format!("Bearer {KEY}");
        let bearer_other = format!("Bearer {OTHER}");
        assert_eq!(
            extract(&[
                ("authorization", bearer.as_bytes()),
                ("authorization", bearer.as_bytes())
            ]),
            Err(CredentialError::Ambiguous),
            "two Authorization headers, even identical"
        );
        assert_eq!(
            extract(&[("x-api-key", KEY.as_bytes()), ("x-api-key", KEY.as_bytes())]),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            extract(&[
                ("authorization", bearer_other.as_bytes()),
                ("x-api-key", KEY.as_bytes())
            ]),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            extract(&[
                ("x-api-key", KEY.as_bytes()),
                ("x-stack-api-key", OTHER.as_bytes())
            ]),
            Err(CredentialError::Ambiguous)
        );
        // Agreeing credentials are fine, and the collection-binding form wins.
        let payload = format!("users API-Key {KEY}");
        let got = extract(&[
            ("authorization", payload.as_bytes()),
            ("x-api-key", KEY.as_bytes()),
        ]);
        assert_eq!(got.unwrap().unwrap().1, CredentialSource::Collection(0));
    }

    #[test]
    fn query_parameter_only_when_configured() {
        let map = HeaderMap::new();
        let query = format!("a=1&api_key={KEY}");
        let got = extractor().extract(&map, Some(&query)).unwrap().unwrap();
        assert_eq!(got.source(), CredentialSource::Query);
        assert!(CredentialExtractor::new(["users"])
            .extract(&map, Some(&query))
            .unwrap()
            .is_none());
        let twice = format!("api_key={KEY}&api_key={KEY}");
        assert_eq!(
            extractor().extract(&map, Some(&twice)).unwrap_err(),
            CredentialError::Ambiguous
        );
        let differs = headers(&[("x-api-key", OTHER.as_bytes())]);
        assert_eq!(
            extractor().extract(&differs, Some(&query)).unwrap_err(),
            CredentialError::Ambiguous
        );
    }

    #[test]
    fn foreign_bearer_tokens_can_be_left_alone() {
        let ex = extractor().ignore_foreign_bearer(KeyFormat::default());
        let jwt = headers(&[("authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig")]);
        assert!(ex.extract(&jwt, None).unwrap().is_none());
        // ...but a token with our prefix is ours to judge, even when malformed.
        let ours = headers(&[("authorization", b"Bearer kw_live_short")]);
        assert_eq!(
            ex.extract(&ours, None).unwrap().unwrap().key(),
            b"kw_live_short"
        );
        // A foreign Bearer beside our X-Api-Key is not a disagreement: it is not ours.
        let both = headers(&[
            ("authorization", b"Bearer eyJ.e30.sig"),
            ("x-api-key", KEY.as_bytes()),
        ]);
        let got = ex.extract(&both, None).unwrap().unwrap();
        assert_eq!(got.source(), CredentialSource::Header(0));
        assert!(!got.from_authorization());
    }

    #[test]
    fn debug_redacts_the_key() {
        let map = headers(&[("x-api-key", KEY.as_bytes())]);
        let credential = extractor().extract(&map, None).unwrap().unwrap();
        assert!(!format!("{credential:?}").contains("kw_live"));
        assert_eq!(
            format!("{credential:?}"),
            r#"Credential { key: "[redacted]", source: Header(0) }"#
        );
    }

    #[test]
    fn visible_ascii_check_agrees_with_the_byte_loop_at_every_byte_and_position() {
        for len in 0..=24 {
            for pos in 0..len {
                for byte in 0..=255u8 {
                    let mut bytes = vec![b'k'; len];
                    bytes[pos] = byte;
                    assert_eq!(
                        all_visible_ascii(&bytes),
                        byte.is_ascii_graphic(),
                        "byte {byte:#04x} at {pos} of {len}"
                    );
                }
            }
            assert!(all_visible_ascii(&vec![b'~'; len]));
            assert!(all_visible_ascii(&vec![b'!'; len]));
        }
    }

    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            "(Bearer|bearer|users|teams|Basic|API-Key|api-key| |\t|kw_live_|[A-Za-z0-9_.-]{1,20}){0,6}"
                .prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #[test]
        fn visible_ascii_check_agrees_with_the_byte_loop(
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            prop_assert_eq!(
                all_visible_ascii(&bytes),
                bytes.iter().all(u8::is_ascii_graphic)
            );
        }
    }

    proptest! {
        #[test]
        fn never_panics_and_results_are_valid(
            entries in proptest::collection::vec(
                (prop_oneof![Just("authorization"), Just("x-api-key"), Just("x-stack-api-key"), Just("other")],
                 header_value()),
                0..5),
            query in proptest::option::of("[a-z_=&A-Za-z0-9]{0,40}"),
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in &entries {
                if let Ok(v) = HeaderValue::from_bytes(value) {
                    map.append(*name, v);
                }
            }
            let ex = extractor();
            if let Ok(Some(c)) = ex.extract(&map, query.as_deref()) {
                prop_assert!(!c.key().is_empty() && c.key().len() <= MAX_KEY_LEN);
                prop_assert!(c.key().iter().all(u8::is_ascii_graphic));
            }
            let _ = ex.ignore_foreign_bearer(KeyFormat::default()).extract(&map, query.as_deref());
        }

        /// The one pass over the headers (with and without marking) decides exactly as the
        /// hashed lookups do, and marks sensitive exactly the headers that carried the
        /// credential, for every extractor shape and header mix.
        #[test]
        fn the_one_pass_decides_and_marks_as_the_lookups_would(
            entries in proptest::collection::vec(
                (prop_oneof![
                    Just("authorization"), Just("x-api-key"), Just("x-stack-api-key"),
                    Just("x-other"), Just("host"), Just("accept")
                ], prop_oneof![
                    Just(format!("Bearer {KEY}").into_bytes()),
                    Just(format!("users API-Key {KEY}").into_bytes()),
                    Just(format!("teams API-Key {OTHER}").into_bytes()),
                    Just(format!("nobody API-Key {KEY}").into_bytes()),
                    Just(b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.x".to_vec()),
                    Just(KEY.as_bytes().to_vec()),
                    Just(OTHER.as_bytes().to_vec()),
                    header_value(),
                ]),
                0..8),
            padding in 0..40usize,
            shape in 0..4usize,
        ) {
            let mut map = HeaderMap::new();
            for i in 0..padding {
                map.append(
                    HeaderName::try_from(format!("x-pad-{i}")).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            for (name, value) in &entries {
                if let Ok(v) = HeaderValue::from_bytes(value) {
                    map.append(*name, v);
                }
            }
            let base = CredentialExtractor::new(["users", "teams"]);
            let ex = match shape {
                0 => base,
                1 => base.header(HeaderName::from_static("x-stack-api-key")),
                2 => base.ignore_foreign_bearer(KeyFormat::default()),
                _ => base
                    .foreign_bearer_as_fallback(KeyFormat::default())
                    .header(HeaderName::from_static("x-stack-api-key"))
                    .exact_api_key_form(1),
            };
            let summary = |r: Result<Option<Credential<'_>>, CredentialError>| {
                r.map(|c| c.map(|c| (c.key().to_vec(), c.source(), c.from_authorization(), c.header_sources())))
            };
            let by_lookup = summary(ex.extract_by_lookup(&map, None));
            prop_assert_eq!(&summary(ex.extract(&map, None)), &by_lookup);
            let mut marked = map.clone();
            let scanned = ex.extract_marking(&mut marked, summary);
            prop_assert_eq!(scanned.is_some(), map.len() <= SCAN_LIMIT);
            if let Some(scanned) = scanned {
                prop_assert_eq!(&scanned, &by_lookup);
                // Marked: every value of a header that carried the credential, nothing else.
                let carried = |name: &HeaderName| match &by_lookup {
                    Ok(Some((_, _, from_authorization, sources))) => {
                        if *name == AUTHORIZATION {
                            *from_authorization
                        } else {
                            let index = ex.header_names().iter().position(|n| n == name);
                            match (index, sources) {
                                (Some(_), HeaderSources::Several) => true,
                                (Some(i), HeaderSources::One(j)) => i == *j,
                                _ => false,
                            }
                        }
                    }
                    _ => false,
                };
                for (name, value) in &marked {
                    prop_assert_eq!(value.is_sensitive(), carried(name), "{}", name);
                }
            }
        }

        #[test]
        fn any_visible_key_roundtrips_through_every_form(key in "[!-~]{1,100}") {
            for (name, value) in [
                ("authorization", format!("Bearer {key}")),
                ("authorization", format!("users API-Key {key}")),
                ("x-api-key", key.clone()),
            ] {
                let map = headers(&[(name, value.as_bytes())]);
                let got = extractor().extract(&map, None).unwrap().unwrap();
                prop_assert_eq!(got.key(), key.as_bytes());
            }
        }
    }

    #[test]
    fn the_extractor_debug_shows_its_configuration() {
        let ex = CredentialExtractor::new(["users"]).claim_bearer(|_| false);
        assert_eq!(
            format!("{ex:?}"),
            r#"CredentialExtractor { collections: ["users"], headers: ["x-api-key"], query_param: None, foreign_bearer: None, bearer_fallback: false, exact: [], bearer_claims: 1 }"#
        );
    }

    #[test]
    fn the_extractor_reports_its_configuration() {
        let ex = extractor();
        let collections: Vec<&str> = ex.collections().iter().map(|c| &**c).collect();
        assert_eq!(collections, ["users", "teams"]);
        assert_eq!(
            ex.header_names(),
            [X_API_KEY, HeaderName::from_static("x-stack-api-key")]
        );
        assert!(CredentialExtractor::new(Vec::<String>::new())
            .collections()
            .is_empty());
    }

    /// Payload CMS's own spelling, byte for byte, for the collections configured so; any
    /// other spelling of their form is not a credential, and other collections keep the
    /// lenient form.
    #[test]
    fn the_exact_form_accepts_only_payloads_spelling() {
        let ex = CredentialExtractor::new(["users", "payload"])
            .exact_api_key_form(1)
            .exact_api_key_form(1);
        let get = |value: String| {
            let map = headers(&[("authorization", value.as_bytes())]);
            ex.extract(&map, None)
                .map(|c| c.map(|c| (c.key().to_vec(), c.source())))
        };
        assert_eq!(
            get(format!("payload API-Key {KEY}")),
            Ok(Some((
                KEY.as_bytes().to_vec(),
                CredentialSource::Collection(1)
            )))
        );
        assert_eq!(
            get(format!("  payload API-Key {KEY} ")),
            Ok(Some((
                KEY.as_bytes().to_vec(),
                CredentialSource::Collection(1)
            ))),
            "surrounding whitespace is not part of the value"
        );
        for other in ["payload api-key", "payload API-KEY", "payload  API-Key"] {
            assert_eq!(get(format!("{other} {KEY}")), Ok(None), "{other}");
        }
        assert_eq!(
            get(format!("users api-key {KEY}")),
            Ok(Some((
                KEY.as_bytes().to_vec(),
                CredentialSource::Collection(0)
            )))
        );
        assert!(matches!(
            get("payload API-Key a\u{e9}b".to_owned()),
            Err(CredentialError::Malformed(_))
        ));
    }

    /// With foreign `Bearer` tokens ignored, a claim predicate still takes the tokens it
    /// recognises (a foreign collection's, such as Strapi's).
    #[test]
    fn claimed_bearer_tokens_are_credentials_when_foreign_ones_are_ignored() {
        let ex = extractor()
            .ignore_foreign_bearer(KeyFormat::default())
            .claim_bearer(|token| token.starts_with(b"strapi_"));
        let claimed = headers(&[("authorization", b"Bearer strapi_0123")]);
        let got = ex.extract(&claimed, None).unwrap().unwrap();
        assert_eq!(
            (got.key(), got.source()),
            (&b"strapi_0123"[..], CredentialSource::Bearer)
        );
        let jwt = headers(&[("authorization", b"Bearer eyJ.e30.sig")]);
        assert!(ex.extract(&jwt, None).unwrap().is_none());
    }

    /// A foreign `Bearer` token as a fallback: the credential when alone, ignored beside a
    /// key header, and validated only when it is used.
    #[test]
    fn a_fallback_bearer_token_counts_only_when_nothing_else_does() {
        let ex = extractor().foreign_bearer_as_fallback(KeyFormat::default());
        let alone = headers(&[("authorization", b"Bearer eyJ.e30.sig")]);
        let got = ex.extract(&alone, None).unwrap().unwrap();
        assert_eq!(got.key(), b"eyJ.e30.sig");
        assert_eq!(got.source(), CredentialSource::Bearer);
        assert!(got.from_authorization());
        assert_eq!(got.header_sources(), HeaderSources::None);

        let beside = headers(&[
            ("authorization", b"Bearer eyJ.e30.sig"),
            ("x-api-key", KEY.as_bytes()),
        ]);
        let got = ex.extract(&beside, None).unwrap().unwrap();
        assert_eq!(
            (got.key(), got.source()),
            (KEY.as_bytes(), CredentialSource::Header(0))
        );
        assert!(!got.from_authorization());
        let query = format!("api_key={KEY}");
        let got = ex.extract(&alone, Some(&query)).unwrap().unwrap();
        assert_eq!(got.source(), CredentialSource::Query);

        let bad = headers(&[("authorization", b"Bearer tok\xffen")]);
        assert!(matches!(
            ex.extract(&bad, None),
            Err(CredentialError::Malformed(_))
        ));
        let bad_beside = headers(&[
            ("authorization", b"Bearer tok\xffen"),
            ("x-api-key", KEY.as_bytes()),
        ]);
        assert_eq!(
            ex.extract(&bad_beside, None).unwrap().unwrap().key(),
            KEY.as_bytes()
        );

        // Our own format is never a fallback, and ignoring foreign tokens undoes it.
        let ours = headers(&[
            ("authorization", format!("Bearer {OTHER}").as_bytes()),
            ("x-api-key", KEY.as_bytes()),
        ]);
        assert_eq!(
            ex.extract(&ours, None).unwrap_err(),
            CredentialError::Ambiguous
        );
        let ignoring = ex.ignore_foreign_bearer(KeyFormat::default());
        assert!(ignoring.extract(&alone, None).unwrap().is_none());
    }

    /// One key in several places: where it came from is the union of the places, which is
    /// what decides the headers the layer marks sensitive or strips.
    #[test]
    fn agreeing_credentials_remember_every_place_they_came_from() {
        let bearer = format!("Bearer {KEY}");
        let places = |pairs: &[(&str, &[u8])], query: Option<&str>| {
            let map = headers(pairs);
            let c = extractor().extract(&map, query).unwrap().unwrap();
            (c.source(), c.from_authorization(), c.header_sources())
        };
        assert_eq!(
            places(&[("authorization", bearer.as_bytes())], None),
            (CredentialSource::Bearer, true, HeaderSources::None)
        );
        assert_eq!(
            places(&[("x-stack-api-key", KEY.as_bytes())], None),
            (CredentialSource::Header(1), false, HeaderSources::One(1))
        );
        assert_eq!(
            places(
                &[
                    ("authorization", bearer.as_bytes()),
                    ("x-api-key", KEY.as_bytes())
                ],
                None
            ),
            (CredentialSource::Bearer, true, HeaderSources::One(0))
        );
        assert_eq!(
            places(
                &[
                    ("x-api-key", KEY.as_bytes()),
                    ("x-stack-api-key", KEY.as_bytes())
                ],
                None
            ),
            (CredentialSource::Header(0), false, HeaderSources::Several)
        );
        let query = format!("api_key={KEY}");
        assert_eq!(
            places(&[("x-stack-api-key", KEY.as_bytes())], Some(&query)),
            (CredentialSource::Header(1), false, HeaderSources::One(1))
        );
        assert_eq!(
            places(&[], Some(&query)),
            (CredentialSource::Query, false, HeaderSources::None)
        );
        let payload = format!("teams API-Key {KEY}");
        assert_eq!(
            places(
                &[
                    ("x-api-key", KEY.as_bytes()),
                    ("authorization", payload.as_bytes())
                ],
                None
            ),
            (CredentialSource::Collection(1), true, HeaderSources::One(0))
        );
    }
}
