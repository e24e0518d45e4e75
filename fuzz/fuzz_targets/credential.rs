//! Credential extraction from arbitrary header maps (and a query string).
//!
//! Input: first line `?<query>` (or anything else: no query), then `name: value` lines.
//! Invariants, for a plain extractor and one that leaves foreign Bearer tokens alone:
//! - extraction is deterministic and ignores unrelated headers;
//! - no credential header at all → `Ok(None)`; two `Authorization` headers → ambiguous;
//! - a returned key is 1..=512 visible ASCII bytes, taken from a credential source, with
//!   the source's syntax around it, and every other credential source present agrees;
//! - adding an agreeing `X-Api-Key` keeps the result; a disagreeing one makes it ambiguous;
//! - `Debug` of a credential never shows the key.
#![no_main]

use std::sync::OnceLock;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use keywarden::{credential::Credential, credential::CredentialError, credential::CredentialExtractor, credential::CredentialSource, key::KeyFormat};
use keywarden_fuzz::{headers, split_lines, trim_ows};
use libfuzzer_sys::fuzz_target;

const COLLECTIONS: [&str; 3] = ["users", "teams", "services"];
const QUERY_PARAM: &str = "api_key";

fn extractors() -> [CredentialExtractor; 2] {
    let plain = CredentialExtractor::new(COLLECTIONS)
        .header(HeaderName::from_static("x-stack-api-key"))
        .query_param(QUERY_PARAM);
    let optional = plain.clone().ignore_foreign_bearer(KeyFormat::default());
    [plain, optional]
}

fn query_values<'a>(query: Option<&'a str>) -> Vec<&'a [u8]> {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == QUERY_PARAM).then_some(v.as_bytes())
        })
        .collect()
}

fn within(inner: &[u8], outer: &[u8]) -> bool {
    let (start, end) = (
        inner.as_ptr() as usize,
        inner.as_ptr() as usize + inner.len(),
    );
    let (o_start, o_end) = (
        outer.as_ptr() as usize,
        outer.as_ptr() as usize + outer.len(),
    );
    start >= o_start && end <= o_end
}

type Outcome = Result<Option<(Vec<u8>, CredentialSource, bool)>, CredentialError>;

fn owned(result: Result<Option<Credential<'_>>, CredentialError>) -> Outcome {
    result.map(|c| c.map(|c| (c.key().to_vec(), c.source(), c.from_authorization())))
}

fn check(extractor: &CredentialExtractor, map: &HeaderMap, query: Option<&str>, foreign: bool) {
    let result = extractor.extract(map, query);
    assert_eq!(
        owned(result),
        owned(extractor.extract(map, query)),
        "deterministic"
    );

    let authorization: Vec<&HeaderValue> = map.get_all(AUTHORIZATION).iter().collect();
    let key_headers: Vec<Vec<&HeaderValue>> = extractor
        .header_names()
        .iter()
        .map(|name| map.get_all(name).iter().collect())
        .collect();
    let query_hits = query_values(query);
    let any_source = !authorization.is_empty()
        || key_headers.iter().any(|v| !v.is_empty())
        || !query_hits.is_empty();

    if !any_source {
        assert!(
            matches!(result, Ok(None)),
            "no credential source, yet {result:?}"
        );
    }
    if authorization.len() > 1 {
        assert_eq!(result.unwrap_err(), CredentialError::Ambiguous);
    }
    if key_headers.iter().any(|v| v.len() > 1) || query_hits.len() > 1 {
        assert!(result.is_err(), "a repeated key source must be an error");
    }

    match result {
        Ok(None) => {
            assert!(
                key_headers.iter().all(Vec::is_empty),
                "a key header was ignored"
            );
            assert!(query_hits.is_empty(), "the query parameter was ignored");
        }
        Ok(Some(credential)) => {
            let key = credential.key();
            assert!(!key.is_empty() && key.len() <= keywarden::key::MAX_KEY_LEN);
            assert!(key.iter().all(u8::is_ascii_graphic));
            assert_eq!(
                format!("{credential:?}"),
                format!(
                    "Credential {{ key: \"[redacted]\", source: {:?} }}",
                    credential.source()
                )
            );
            // Every key header and query parameter present carries this very key.
            for values in &key_headers {
                if let Some(value) = values.first() {
                    assert_eq!(trim_ows(value.as_bytes()), key, "disagreeing key header");
                }
            }
            if let Some(value) = query_hits.first() {
                assert_eq!(*value, key, "disagreeing query parameter");
            }
            let auth = authorization.first().map(|v| trim_ows(v.as_bytes()));
            assert!(!credential.from_authorization() || auth.is_some());
            match credential.source() {
                CredentialSource::Bearer => {
                    let auth = auth.expect("Bearer without Authorization");
                    assert!(
                        within(key, auth),
                        "the key comes from the Authorization value"
                    );
                    assert!(auth[..7].eq_ignore_ascii_case(b"bearer "));
                    assert!(auth.ends_with(key));
                    assert!(trim_ows(&auth[7..auth.len() - key.len()]).is_empty());
                    if foreign {
                        assert!(KeyFormat::default().claims(key), "foreign Bearer taken");
                    }
                }
                CredentialSource::Collection(index) => {
                    let auth = auth.expect("API-Key form without Authorization");
                    assert!(within(key, auth));
                    let slug = COLLECTIONS[index].as_bytes();
                    assert!(auth.starts_with(slug) && auth[slug.len()] == b' ');
                    assert!(auth.ends_with(key));
                    let middle = &auth[slug.len()..auth.len() - key.len()];
                    let word: Vec<u8> = middle.iter().copied().filter(|&b| b != b' ').collect();
                    assert!(word.eq_ignore_ascii_case(b"api-key"), "{middle:?}");
                }
                CredentialSource::Header(index) => {
                    let value = key_headers[index].first().expect("the header is present");
                    assert!(within(key, value.as_bytes()));
                }
                CredentialSource::Query => {
                    let value = query_hits.first().expect("the parameter is present");
                    assert!(within(key, value));
                }
                other => panic!("unexpected source {other:?}"),
            }

            // Metamorphic: agreeing and disagreeing extra credentials.
            if map.get("x-api-key").is_none() {
                let mut agreeing = map.clone();
                agreeing.insert("x-api-key", HeaderValue::from_bytes(key).unwrap());
                let again = owned(extractor.extract(&agreeing, query)).unwrap().unwrap();
                assert_eq!(again.0, key);
                if let CredentialSource::Collection(_) = credential.source() {
                    assert_eq!(again.1, credential.source(), "the slug binding wins");
                }
                if key.len() < keywarden::key::MAX_KEY_LEN {
                    let mut other = key.to_vec();
                    other.push(b'x');
                    let mut disagreeing = map.clone();
                    disagreeing.insert("x-api-key", HeaderValue::from_bytes(&other).unwrap());
                    assert_eq!(
                        extractor.extract(&disagreeing, query).unwrap_err(),
                        CredentialError::Ambiguous
                    );
                }
            }
        }
        Err(_) => {
            assert!(any_source);
        }
    }

    // Unrelated headers never change the outcome.
    let mut noisy = map.clone();
    noisy.append("x-unrelated", HeaderValue::from_static("kw_live_unrelated"));
    noisy.append("cookie", HeaderValue::from_static("api_key=nope"));
    assert_eq!(owned(extractor.extract(&noisy, query)), owned(result));
}

fuzz_target!(|data: &[u8]| {
    let (first, lines) = split_lines(data);
    let query = first
        .strip_prefix(b"?")
        .and_then(|q| std::str::from_utf8(q).ok());
    let map = headers(&lines, &[]);
    static EXTRACTORS: OnceLock<[CredentialExtractor; 2]> = OnceLock::new();
    let [plain, optional] = EXTRACTORS.get_or_init(extractors);
    check(plain, &map, query, false);
    check(optional, &map, query, true);
});
