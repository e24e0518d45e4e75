//! Adversarial requests against a real server on loopback.
//!
//! Raw TCP for what a client library would normalise or refuse (non-UTF-8 and control bytes,
//! repeated headers, odd whitespace, oversized heads), reqwest for the rest. Every answer
//! must be exactly the expected one of:
//! - the handler's 200,
//! - a documented rejection of DESIGN §4 (status, problem+json `code`, `status` field and
//!   the `WWW-Authenticate` challenge), or its trailers-only gRPC form,
//! - for requests the HTTP server itself refuses before any middleware runs (a control byte
//!   in a header, a head past hyper's limits): hyper's bare 400 / 431, or a closed connection.
//!
//! Never a 500, never a key echoed back, never a hang (every exchange has a timeout).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use keywarden::{NewKey, RejectionKind};
use support::Fixture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(5);

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The handler answered 200 for this subject.
    Ok(String),
    /// A documented rejection, checked against the contract.
    Rejected(u16, &'static str),
    /// A trailers-only gRPC rejection: grpc-status and grpc-message.
    Grpc(&'static str, &'static str),
    /// The HTTP server refused the request before the layer: its bare status.
    Refused(u16),
    /// The HTTP server closed the connection without an answer (a head past its limit).
    Closed,
}

fn rejected(code: &'static str) -> Outcome {
    let kind = RejectionKind::ALL
        .into_iter()
        .find(|k| k.code() == code)
        .unwrap_or_else(|| panic!("undocumented code {code}"));
    Outcome::Rejected(kind.status().as_u16(), code)
}

fn documented_code(code: &str) -> &'static str {
    RejectionKind::ALL
        .into_iter()
        .map(RejectionKind::code)
        .find(|c| *c == code)
        .unwrap_or_else(|| panic!("undocumented code {code:?}"))
}

struct Raw {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(bytes: &[u8]) -> Raw {
    let end = find(bytes, b"\r\n\r\n").expect("a complete response head");
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()))
        .collect();
    let mut body = bytes[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case(b"chunked"));
    if chunked {
        let mut decoded = Vec::new();
        let mut rest = body.as_slice();
        while let Some(line_end) = find(rest, b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16)
                .expect("chunk size");
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = decoded;
    }
    Raw {
        status,
        headers,
        body,
    }
}

/// Judges a response against the contract and returns what it was.
fn judge(raw: &Raw, forbidden: &[&str]) -> Outcome {
    assert_ne!(raw.status, 500, "a 500");
    for secret in forbidden {
        assert!(
            find(&raw.body, secret.as_bytes()).is_none(),
            "a key echoed in the body"
        );
        for (_, value) in &raw.headers {
            assert!(find(value, secret.as_bytes()).is_none(), "a key echoed");
        }
    }
    let content_type = raw.header("content-type").unwrap_or_default();
    if content_type == b"application/problem+json" {
        let json: serde_json::Value = serde_json::from_slice(&raw.body).expect("problem JSON");
        let code = documented_code(json["code"].as_str().expect("a code"));
        assert_eq!(json["status"], raw.status, "status field");
        assert!(json["title"].is_string() && json["detail"].is_string());
        let outcome = rejected(code);
        assert_eq!(
            outcome,
            Outcome::Rejected(raw.status, code),
            "{code}'s status"
        );
        let challenge = raw.header("www-authenticate");
        match raw.status {
            401 => {
                let challenge = String::from_utf8_lossy(challenge.expect("a challenge"));
                assert_eq!(
                    challenge.contains("error=\"invalid_token\""),
                    code != "missing_credentials",
                    "{challenge}"
                );
            }
            403 => assert!(find(challenge.unwrap(), b"insufficient_scope").is_some()),
            429 | 503 => assert!(raw.header("retry-after").is_some()),
            _ => {}
        }
        return outcome;
    }
    if let Some(status) = raw.header("grpc-status") {
        assert_eq!(raw.status, 200, "gRPC rejections are trailers-only");
        assert_eq!(content_type, b"application/grpc");
        assert!(raw.body.is_empty());
        let message =
            documented_code(std::str::from_utf8(raw.header("grpc-message").unwrap()).unwrap());
        let kind = RejectionKind::ALL
            .into_iter()
            .find(|k| k.code() == message)
            .unwrap();
        assert_eq!(status, kind.grpc_code().to_string().as_bytes(), "{message}");
        let status: &'static str = ["3", "7", "8", "14", "16"]
            .into_iter()
            .find(|s| s.as_bytes() == status)
            .unwrap();
        return Outcome::Grpc(status, message);
    }
    if raw.status == 200 {
        let json: serde_json::Value = serde_json::from_slice(&raw.body).expect("a principal");
        return Outcome::Ok(json["subject"].as_str().unwrap().to_owned());
    }
    assert!(
        matches!(raw.status, 400 | 431),
        "only the HTTP server's own 400/431 may skip the contract, got {}",
        raw.status
    );
    assert!(raw.header("www-authenticate").is_none());
    Outcome::Refused(raw.status)
}

/// One request over a fresh connection, raw bytes in and out.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Raw> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read an oversized head: a failed write
    // is fine, whatever it answered is read below.
    let _ = tokio::time::timeout(TIMEOUT, stream.write_all(request))
        .await
        .expect("the server reads the request without stalling");
    let mut response = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut response))
        .await
        .expect("the server answers in time");
    if response.is_empty() {
        // A reset or a close without a response.
        let _ = read;
        return None;
    }
    Some(parse_response(&response))
}

fn request(method: &str, path: &str, headers: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n")
        .into_bytes();
    for header in headers {
        out.extend_from_slice(header);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: 0\r\n\r\n");
    out
}

async fn outcome(addr: SocketAddr, req: &[u8], forbidden: &[&str]) -> Outcome {
    match exchange(addr, req).await {
        Some(raw) => judge(&raw, forbidden),
        None => Outcome::Closed,
    }
}

async fn serve(fx: &Fixture) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = fx.app();
    let handle = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, handle)
}

struct Keys {
    alice: String,
    team: String,
    revoked: String,
}

async fn keys(fx: &Fixture) -> Keys {
    let alice = fx
        .key(NewKey::new("a", "alice"))
        .await
        .key
        .expose()
        .to_owned();
    let team = fx
        .key(NewKey::new("t", "team-1").collection("teams"))
        .await
        .key
        .expose()
        .to_owned();
    let revoked = fx.key(NewKey::new("r", "rev")).await;
    fx.manager.revoke(revoked.record.id).await.unwrap();
    Keys {
        alice,
        team,
        revoked: revoked.key.expose().to_owned(),
    }
}

fn h(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// Runs `(headers, expected)` cases against `/whoami`.
async fn run_cases(addr: SocketAddr, cases: &[(Vec<Vec<u8>>, Outcome)], forbidden: &[&str]) {
    for (headers, expected) in cases {
        let refs: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        let got = outcome(addr, &request("GET", "/whoami", &refs), forbidden).await;
        let shown: Vec<String> = headers
            .iter()
            .map(|h| String::from_utf8_lossy(&h[..h.len().min(80)]).into_owned())
            .collect();
        assert_eq!(&got, expected, "headers {shown:?}");
    }
}

#[tokio::test]
async fn bytes_a_client_library_would_not_send() {
    let fx = Fixture::new();
    let k = keys(&fx).await;
    let (addr, server) = serve(&fx).await;
    let ok = Outcome::Ok("alice".into());
    let key = k.alice.as_str();
    let kb = key.as_bytes();
    let with = |prefix: &[u8], suffix: &[u8]| [prefix, kb, suffix].concat();
    let cases: Vec<(Vec<Vec<u8>>, Outcome)> = vec![
        // Non-UTF-8 (obs-text) bytes reach the layer and are malformed.
        (vec![b"x-api-key: kw_live_\xff\xfe\x80".to_vec()], rejected("malformed_key")),
        (vec![with(b"authorization: Bearer ", b"\xc3\xa9")], rejected("malformed_key")),
        (vec![b"authorization: \xff\xff API-Key abc".to_vec()], rejected("invalid_key")),
        // obs-text in an unrelated header does not disturb a good key.
        (vec![b"x-note: caf\xe9".to_vec(), with(b"x-api-key: ", b"")], ok.clone()),
        // A tab inside a value is legal HTTP but not a key character.
        (vec![[&kb[..20], b"\t", &kb[20..]].concat().into_iter().fold(h("x-api-key: "), |mut v, b| { v.push(b); v })], rejected("malformed_key")),
        // Control bytes and DEL are refused by the HTTP parser before any middleware.
        (vec![with(b"x-api-key: ", b"\x01")], Outcome::Refused(400)),
        (vec![with(b"x-api-key: ", b"\x7f")], Outcome::Refused(400)),
        (vec![with(b"authorization: Bearer \x00", b"")], Outcome::Refused(400)),
        (vec![with(b"x-api-key: ", b"\x1b[0m")], Outcome::Refused(400)),
        // Repeated credential headers, in any letter case.
        (vec![with(b"authorization: Bearer ", b""), with(b"Authorization: Bearer ", b"")], rejected("ambiguous_credentials")),
        (vec![with(b"X-Api-Key: ", b""), with(b"x-api-key: ", b"")], rejected("ambiguous_credentials")),
        (vec![with(b"X-API-KEY: ", b""), with(b"x-api-key: ", b"")], rejected("ambiguous_credentials")),
        (vec![with(b"authorization: Bearer ", b""), with(b"x-api-key: ", b"")], ok.clone()),
        (vec![with(b"authorization: users API-Key ", b""), with(b"x-api-key: ", b"")], ok.clone()),
        (vec![with(b"authorization: Bearer ", b""), format!("x-api-key: {}", k.team).into_bytes()], rejected("ambiguous_credentials")),
        (vec![h("authorization: Basic dXNlcjpwYXNz"), h("authorization: Bearer x")], rejected("ambiguous_credentials")),
        // Scheme and keyword case; the slug is exact.
        (vec![with(b"authorization: bEaReR ", b"")], ok.clone()),
        (vec![with(b"authorization: BEARER ", b"")], ok.clone()),
        (vec![with(b"authorization: users aPi-KeY ", b"")], ok.clone()),
        (vec![with(b"authorization: USERS API-Key ", b"")], rejected("invalid_key")),
        (vec![with(b"authorization: Users API-Key ", b"")], rejected("invalid_key")),
        // Whitespace: extra spaces between words, OWS around values, tabs as separators.
        (vec![with(b"authorization: Bearer       ", b"")], ok.clone()),
        (vec![with(b"authorization:    Bearer ", b"   ")], ok.clone()),
        (vec![with(b"authorization: users    API-Key    ", b"")], ok.clone()),
        (vec![with(b"x-api-key:\t\t", b"\t ")], ok.clone()),
        // RFC 9110 separates the scheme with SP only: a tab leaves no credential.
        (vec![with(b"authorization: Bearer\t", b"")], rejected("missing_credentials")),
        (vec![with(b"authorization: users\tAPI-Key ", b"")], rejected("missing_credentials")),
        // Trailing garbage.
        (vec![with(b"authorization: Bearer ", b" extra")], rejected("malformed_key")),
        (vec![with(b"authorization: Bearer ", b",")], rejected("malformed_key")),
        (vec![with(b"x-api-key: ", b";q=1")], rejected("malformed_key")),
        (vec![with(b"x-api-key: ", b"0")], rejected("malformed_key")),
        (vec![with(b"authorization: users API-Key ", b" users")], rejected("malformed_key")),
        (vec![with(b"x-api-key: \"", b"\"")], rejected("malformed_key")),
        // Keys of other formats.
        (vec![h("authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")], rejected("malformed_key")),
        (vec![h("x-api-key: 3f0e5a3c-9d2b-4c1e-8f7a-0b1c2d3e4f5a")], rejected("malformed_key")),
        (vec![h("x-api-key: sk_live_51HqLyjWDarjtT1zdp7dcXvFnYLqxYcJ9tZ0Mc0Hn2B3Lm4xNqPz")], rejected("malformed_key")),
        (vec![h("authorization: users API-Key ghp_16C7e42F292c6912E7710c838347Ae178B4a")], rejected("malformed_key")),
        (vec![h("x-api-key: AKIAIOSFODNN7EXAMPLE")], rejected("malformed_key")),
        // Our prefix, wrong shape: malformed, never looked up.
        (vec![h("x-api-key: kw_live_")], rejected("malformed_key")),
        (vec![h("x-api-key: kw_prod_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklm")], rejected("malformed_key")),
        // Empty values.
        (vec![h("x-api-key:")], rejected("malformed_key")),
        (vec![h("x-api-key:    ")], rejected("malformed_key")),
        (vec![h("authorization:")], rejected("missing_credentials")),
        (vec![h("authorization: Bearer")], rejected("malformed_key")),
        (vec![h("authorization: Bearer    ")], rejected("malformed_key")),
        (vec![h("authorization: users API-Key")], rejected("malformed_key")),
        (vec![h("authorization: users API-Key   ")], rejected("malformed_key")),
        // Slugs that are not collections, and unknown schemes.
        (vec![with(b"authorization: admins API-Key ", b"")], rejected("invalid_key")),
        (vec![with(b"authorization: teams API-Key ", b"")], rejected("invalid_key")),
        (vec![with(b"authorization: bearer API-Key ", b"")], rejected("malformed_key")),
        (vec![with(b"authorization: * API-Key ", b"")], rejected("invalid_key")),
        (vec![with(b"authorization: ../users API-Key ", b"")], rejected("invalid_key")),
        (vec![h("authorization: Basic dXNlcjpwYXNz")], rejected("missing_credentials")),
        (vec![with(b"authorization: Token ", b"")], rejected("missing_credentials")),
        (vec![with(b"authorization: ", b"")], rejected("missing_credentials")),
        // Unicode look-alikes of the prefix, the scheme and the slug (UTF-8 on the wire).
        (vec![["x-api-key: \u{043a}w_live_".as_bytes(), &kb[8..]].concat()], rejected("malformed_key")),
        (vec![["x-api-key: \u{ff4b}\u{ff57}_live_".as_bytes(), &kb[8..]].concat()], rejected("malformed_key")),
        (vec![["x-api-key: kw\u{2f}live_".as_bytes(), &kb[8..]].concat()], rejected("malformed_key")),
        (vec![["x-api-key: kw_l\u{0456}ve_".as_bytes(), &kb[8..]].concat()], rejected("malformed_key")),
        (vec![with("authorization: B\u{0435}arer ".as_bytes(), b"")], rejected("missing_credentials")),
        (vec![with("authorization: \u{ff55}sers API-Key ".as_bytes(), b"")], rejected("invalid_key")),
        (vec![with("authorization: users API\u{2010}Key ".as_bytes(), b"")], rejected("missing_credentials")),
        (vec![with(b"x-api-key: \xef\xbb\xbf", b"")], rejected("malformed_key")),
        // State of a well-formed key.
        (vec![format!("x-api-key: {}", k.revoked).into_bytes()], rejected("revoked_key")),
        (vec![format!("authorization: users API-Key {}", k.team).into_bytes()], rejected("invalid_key")),
        (vec![format!("authorization: teams API-Key {}", k.team).into_bytes()], Outcome::Ok("team-1".into())),
        (vec![], rejected("missing_credentials")),
    ];
    let forbidden = [k.alice.as_str(), k.team.as_str(), k.revoked.as_str()];
    run_cases(addr, &cases, &forbidden).await;
    server.abort();
}

#[tokio::test]
async fn long_values_long_names_and_many_headers() {
    let fx = Fixture::new();
    let k = keys(&fx).await;
    let (addr, server) = serve(&fx).await;
    let ok = Outcome::Ok("alice".into());
    let key_header = format!("x-api-key: {}", k.alice).into_bytes();
    let long = |n: usize| format!("x-api-key: {}", "A".repeat(n)).into_bytes();
    let filler = |n: usize| -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("x-filler-{i}: {i}").into_bytes())
            .collect()
    };
    let mut cases: Vec<(Vec<Vec<u8>>, Outcome)> = vec![
        // keywarden's own bound is 512 bytes; past it the value is malformed however long.
        (vec![long(512)], rejected("malformed_key")),
        (vec![long(513)], rejected("malformed_key")),
        (vec![long(8 * 1024)], rejected("malformed_key")),
        (vec![long(64 * 1024)], rejected("malformed_key")),
        // Near hyper's head limit (~400 KB by default), still answered by the layer.
        (vec![long(300 * 1024)], rejected("malformed_key")),
        (
            vec![format!(
                "authorization: Bearer {}{}",
                k.alice,
                "x".repeat(200 * 1024)
            )
            .into_bytes()],
            rejected("malformed_key"),
        ),
        // A long unrelated value and a long header name do not disturb a good key.
        (
            vec![
                format!("x-long: {}", "v".repeat(100 * 1024)).into_bytes(),
                key_header.clone(),
            ],
            ok.clone(),
        ),
        (
            vec![
                format!("x-{}: 1", "n".repeat(32 * 1024)).into_bytes(),
                key_header.clone(),
            ],
            ok.clone(),
        ),
        // A long key-ish value with our prefix.
        (
            vec![format!("x-api-key: kw_live_{}", "A".repeat(50 * 1024)).into_bytes()],
            rejected("malformed_key"),
        ),
        // A long slug.
        (
            vec![format!(
                "authorization: {} API-Key {}",
                "u".repeat(16 * 1024),
                k.alice
            )
            .into_bytes()],
            rejected("invalid_key"),
        ),
    ];
    // Many headers below hyper's count limit (100 in total): fine.
    let mut many = filler(90);
    many.push(key_header.clone());
    cases.push((many, ok.clone()));
    let mut many_empty = filler(90);
    many_empty.push(h("x-api-key:"));
    cases.push((many_empty, rejected("malformed_key")));
    let forbidden = [k.alice.as_str()];
    run_cases(addr, &cases, &forbidden).await;

    // Past the server's limits: hyper answers 431 itself (or closes), the layer never runs,
    // and the server keeps serving.
    let past_limits: Vec<Vec<Vec<u8>>> = vec![
        vec![long(1024 * 1024)],
        vec![
            format!("x-{}: 1", "n".repeat(512 * 1024)).into_bytes(),
            key_header.clone(),
        ],
        {
            let mut hundreds = filler(300);
            hundreds.push(key_header.clone());
            hundreds
        },
        {
            let mut hundreds: Vec<Vec<u8>> = (0..200).map(|_| key_header.clone()).collect();
            hundreds.push(key_header.clone());
            hundreds
        },
    ];
    for headers in past_limits {
        let refs: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        let got = outcome(addr, &request("GET", "/whoami", &refs), &forbidden).await;
        assert!(
            matches!(got, Outcome::Refused(431) | Outcome::Closed),
            "past the limit: {got:?}"
        );
    }
    let refs = [key_header.as_slice()];
    assert_eq!(
        outcome(addr, &request("GET", "/whoami", &refs), &forbidden).await,
        ok,
        "still serving"
    );
    server.abort();
}

#[tokio::test]
async fn grpc_content_types_get_trailers_only_answers() {
    let fx = Fixture::new();
    let k = keys(&fx).await;
    let (addr, server) = serve(&fx).await;
    let grpc = |ct: &str, extra: &[Vec<u8>]| -> Vec<Vec<u8>> {
        let mut headers = vec![
            format!("content-type: {ct}").into_bytes(),
            h("te: trailers"),
        ];
        headers.extend_from_slice(extra);
        headers
    };
    let good = format!("x-api-key: {}", k.alice).into_bytes();
    let cases: Vec<(Vec<Vec<u8>>, Outcome)> = vec![
        (
            grpc("application/grpc", &[]),
            Outcome::Grpc("16", "missing_credentials"),
        ),
        (
            grpc("application/grpc+proto", &[h("x-api-key: kw_live_x")]),
            Outcome::Grpc("16", "malformed_key"),
        ),
        (
            grpc(
                "application/grpc-web",
                &[format!("x-api-key: {}", k.revoked).into_bytes()],
            ),
            Outcome::Grpc("16", "revoked_key"),
        ),
        (
            grpc(
                "application/grpc-web+proto",
                &[
                    good.clone(),
                    format!("authorization: Bearer {}", k.team).into_bytes(),
                ],
            ),
            Outcome::Grpc("3", "ambiguous_credentials"),
        ),
        (
            grpc(
                "application/grpc;charset=utf-8",
                &[b"x-api-key: \xff".to_vec()],
            ),
            Outcome::Grpc("16", "malformed_key"),
        ),
        (
            grpc("application/grpc", std::slice::from_ref(&good)),
            Outcome::Ok("alice".into()),
        ),
        // Not gRPC (the gRPC protocol spells it in lowercase): problem+json.
        (
            grpc("Application/GRPC", &[]),
            rejected("missing_credentials"),
        ),
        (
            grpc("application/grp", &[]),
            rejected("missing_credentials"),
        ),
        (
            grpc("text/plain, application/grpc", &[]),
            rejected("missing_credentials"),
        ),
    ];
    let forbidden = [k.alice.as_str(), k.team.as_str(), k.revoked.as_str()];
    // gRPC calls are POSTs: the rejections are the same (the layer decides before routing).
    for (headers, expected) in cases.iter().filter(|(_, e)| !matches!(e, Outcome::Ok(_))) {
        let refs: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        let got = outcome(
            addr,
            &request("POST", "/pkg.Service/Call", &refs),
            &forbidden,
        )
        .await;
        assert_eq!(&got, expected, "{headers:?}");
    }
    run_cases(addr, &cases, &forbidden).await;
    server.abort();
}

/// Client-library requests: methods, paths and query strings, with reqwest.
#[tokio::test]
async fn methods_paths_and_queries_through_a_client() {
    let fx = Fixture::new();
    let k = keys(&fx).await;
    let (addr, server) = serve(&fx).await;
    let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
    let forbidden = [k.alice.as_str(), k.team.as_str(), k.revoked.as_str()];
    let judge_reqwest = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let body = response.bytes().await.unwrap().to_vec();
        Raw {
            status,
            headers,
            body,
        }
    };
    let base = format!("http://{addr}");
    // The query parameter is off by default: a key there is not a credential.
    let raw = judge_reqwest(
        http.get(format!("{base}/whoami?api_key={}", k.alice))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(judge(&raw, &forbidden), rejected("missing_credentials"));
    // Unknown paths and odd methods are still authenticated first.
    for (method, path) in [
        ("GET", "/nope"),
        ("DELETE", "/whoami"),
        ("PATCH", "/%2e%2e/admin"),
        ("OPTIONS", "/whoami"),
        ("PROPFIND", "/"),
        ("GET", "/whoami?x=%ff%00&y"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let raw = judge_reqwest(
            http.request(method.clone(), format!("{base}{path}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            judge(&raw, &forbidden),
            rejected("missing_credentials"),
            "{method} {path}"
        );
        let raw = judge_reqwest(
            http.request(method.clone(), format!("{base}{path}"))
                .header("x-api-key", &k.revoked)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            judge(&raw, &forbidden),
            rejected("revoked_key"),
            "{method} {path}"
        );
        // With a good key the router answers: 200, or its own 404/405 (no body, no key).
        let response = http
            .request(method.clone(), format!("{base}{path}"))
            .header("x-api-key", &k.alice)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(
            matches!(status, 200 | 404 | 405),
            "{method} {path}: {status}"
        );
        let body = response.bytes().await.unwrap();
        assert!(find(&body, k.alice.as_bytes()).is_none());
    }
    // Header forms through the client, with a scope check on /admin.
    let raw = judge_reqwest(
        http.get(format!("{base}/admin"))
            .header("authorization", format!("teams api-key {}", k.team))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(judge(&raw, &forbidden), rejected("insufficient_scope"));
    server.abort();
}
