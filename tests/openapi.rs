//! The management API's OpenAPI document against the router it describes: every documented
//! operation is routed and nothing else is, the committed `docs/openapi.json` is the
//! generated one, the router serves it, and the request bodies the API tests send fit its
//! schemas.
#![cfg(feature = "manage-api")]

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::Router;
use http::{Request, StatusCode};
use keywarden::manage::openapi;
use keywarden::{management_router, KeyManager, NewKey};
use serde_json::{json, Value};
use support::{send, Fixture, Reply};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
const REGENERATE: &str = "KEYWARDEN_WRITE_OPENAPI";

/// Methods a route could answer; OpenAPI documents HEAD with GET.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
];

fn document() -> Value {
    serde_json::to_value(openapi()).unwrap()
}

/// Every documented (path, METHOD), in document order.
fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if METHODS.contains(&method.to_uppercase().as_str()) {
                operations.push((path.clone(), method.to_uppercase()));
            }
        }
    }
    operations
}

/// The management router nested at `/admin` behind a layer, and a `keys:admin` key.
struct Api {
    fx: Fixture,
    app: Router,
    admin: String,
}

impl Api {
    async fn new() -> Self {
        let fx = Fixture::new();
        let manager = Arc::new(KeyManager::for_layer(&fx.layer));
        let app = Router::new()
            .nest("/admin", management_router(manager))
            .layer(fx.layer.clone());
        let admin = fx
            .key(NewKey::new("admin", "root").scope("keys:admin"))
            .await
            .key
            .expose()
            .to_owned();
        Self { fx, app, admin }
    }

    /// `path` with `{id}` replaced by a fresh key's id, so no handler answers 404 itself.
    async fn concrete(&self, path: &str) -> String {
        let id = self.fx.key(NewKey::new("target", "alice")).await.record.id;
        format!("/admin{}", path.replace("{id}", &id.to_string()))
    }

    async fn call(&self, key: &str, method: &str, uri: &str) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if !key.is_empty() {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        send(&self.app, request.body(Body::empty()).unwrap()).await
    }
}

/// A 404 or 405 from axum's routing, not from a handler (whose errors are problem+json).
fn unrouted(reply: &Reply) -> bool {
    let routing = matches!(
        reply.status,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
    );
    routing
        && reply
            .headers
            .get("content-type")
            .is_none_or(|t| t != "application/problem+json")
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_nothing_else() {
    let api = Api::new().await;
    let doc = document();
    let documented = operations(&doc);
    assert!(documented.len() >= 8, "{documented:?}");
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();

    for path in &paths {
        for method in METHODS {
            let is_documented = documented
                .iter()
                .any(|(p, m)| p == *path && (m == method || (method == "HEAD" && m == "GET")));
            let reply = api
                .call(&api.admin, method, &api.concrete(path).await)
                .await;
            if is_documented {
                assert!(
                    !unrouted(&reply),
                    "{method} {path} is documented but not routed ({})",
                    reply.status
                );
            } else {
                assert_eq!(
                    reply.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is routed but not documented"
                );
            }
        }
    }

    // Paths next to the documented ones: their prefixes and extensions are not routes.
    let mut probes = vec!["/".to_owned(), String::new(), "/x".to_owned()];
    for path in &paths {
        probes.push(format!("{path}/"));
        probes.push(format!("{path}/x"));
        let mut prefix = path.as_str();
        while let Some((head, _)) = prefix.rsplit_once('/') {
            if !head.is_empty() && !paths.iter().any(|p| p.as_str() == head) {
                probes.push(head.to_owned());
            }
            prefix = head;
        }
    }
    probes.retain(|probe| !paths.iter().any(|path| matches(path, probe)));
    assert!(probes.len() > paths.len(), "{probes:?}");
    for probe in probes {
        for method in METHODS {
            let reply = api
                .call(&api.admin, method, &api.concrete(&probe).await)
                .await;
            assert!(
                unrouted(&reply) && reply.status == StatusCode::NOT_FOUND,
                "{method} /admin{probe} answers {} but is not documented",
                reply.status
            );
        }
    }
}

/// Whether `probe` is an instance of the template `path` (`{name}` is any one segment).
fn matches(path: &str, probe: &str) -> bool {
    let (path, probe): (Vec<&str>, Vec<&str>) =
        (path.split('/').collect(), probe.split('/').collect());
    path.len() == probe.len()
        && path
            .iter()
            .zip(&probe)
            .all(|(p, q)| p == q || (p.starts_with('{') && !q.is_empty()))
}

#[tokio::test]
async fn the_committed_document_is_the_generated_one() {
    let generated = format!("{}\n", openapi().to_pretty_json().unwrap());
    if std::env::var_os(REGENERATE).is_some() {
        std::fs::write(COMMITTED, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is not the document the code generates; regenerate with \
         `{REGENERATE}=1 cargo test --all-features --test openapi` and commit it"
    );
}

#[tokio::test]
async fn the_router_serves_the_document_to_any_admitted_key() {
    let api = Api::new().await;
    let reader = api
        .fx
        .key(NewKey::new("reader", "bob").scope("read"))
        .await
        .key
        .expose()
        .to_owned();
    for key in [&api.admin, &reader] {
        let reply = api.call(key, "GET", "/admin/openapi.json").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.headers["content-type"], "application/json");
        assert_eq!(reply.json(), document());
    }
    assert_eq!(
        reply_code(&api.call("", "GET", "/admin/openapi.json").await),
        "missing_credentials"
    );
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    for scheme in ["bearer", "x_api_key", "collection_api_key"] {
        assert!(schemes.contains_key(scheme), "{scheme}");
    }
}

fn reply_code(reply: &Reply) -> String {
    reply.code()
}

/// The schema of an operation's JSON request body, references resolved.
fn request_schema<'d>(doc: &'d Value, path: &str, method: &str) -> &'d Value {
    let body = &doc["paths"][path][method]["requestBody"]["content"]["application/json"];
    resolve(doc, &body["schema"])
}

fn resolve<'d>(doc: &'d Value, schema: &'d Value) -> &'d Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.strip_prefix("#/components/schemas/").unwrap();
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// A light structural check of `value` against `schema`: types (with `null`), enums,
/// required and unknown object members, array items, one level of `oneOf`/`anyOf`/`allOf`.
/// Errors name the path of what does not fit.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            check(doc, part, value, at)?;
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(any) = schema[key].as_array() {
            if !any.iter().any(|part| check(doc, part, value, at).is_ok()) {
                return Err(format!("{at}: fits none of {key}"));
            }
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let actual = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let type_fits = types.is_empty()
        || types.contains(&actual)
        || (actual == "integer" && types.contains(&"number"));
    if !type_fits {
        return Err(format!("{at}: a {actual}, expected {types:?}"));
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    match value {
        Value::Object(members) => {
            let properties = schema["properties"].as_object();
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap();
                if !members.contains_key(name) {
                    return Err(format!("{at}: `{name}` is required"));
                }
            }
            for (name, member) in members {
                match properties.and_then(|p| p.get(name)) {
                    Some(property) => check(doc, property, member, &format!("{at}.{name}"))?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{at}: unknown member `{name}`"))
                    }
                    None => {}
                }
            }
        }
        Value::Array(items) if schema.get("items").is_some() => {
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn the_api_tests_request_bodies_fit_the_schemas() {
    let doc = document();
    let create = request_schema(&doc, "/keys", "post");
    let patch = request_schema(&doc, "/keys/{id}", "patch");
    let rotate = request_schema(&doc, "/keys/{id}/rotate", "post");
    for (schema, body) in [
        (create, support::create_example()),
        (create, json!({"name": "mine"})),
        (
            create,
            json!({"name": "n", "owner_kind": "service", "read_only": true}),
        ),
        (patch, support::patch_example()),
        (patch, json!({"disabled": true})),
        (patch, json!({"disabled": false, "metadata": null})),
        (patch, json!({})),
        (rotate, json!({"grace": "1h"})),
        (rotate, json!({"grace": "0s"})),
    ] {
        check(&doc, schema, &body, "body").unwrap_or_else(|error| panic!("{body}: {error}"));
    }
    // What the API refuses before reading a value, the schema refuses too.
    for (schema, body) in [
        (create, json!({"name": "x", "colour": "red"})),
        (create, json!({})),
        (
            create,
            json!({"name": 5, "read_only": "yes", "scopes": "read"}),
        ),
        (create, json!({"name": "x", "owner_kind": "robot"})),
        (create, json!({"name": "x", "metadata": [1]})),
        (patch, json!({"rate_limit": 5})),
        (patch, json!({"metadata": "text"})),
        (patch, json!({"disabled": "no"})),
        (patch, json!({"revoked_at": "2030-01-01T00:00:00Z"})),
        (patch, json!({"subject": "bob"})),
        (rotate, json!({"grace": 5})),
        (rotate, json!({"graces": "1h"})),
    ] {
        assert!(check(&doc, schema, &body, "body").is_err(), "{body} fits");
    }
}

/// `null` means something only for the members a patch can clear.
#[test]
fn the_patch_schema_tells_absent_null_and_value_apart() {
    let doc = document();
    let patch = request_schema(&doc, "/keys/{id}", "patch");
    assert!(
        patch["required"].as_array().is_none_or(Vec::is_empty),
        "{patch}"
    );
    for (member, clearable) in [
        ("name", false),
        ("description", true),
        ("scopes", false),
        ("read_only", false),
        ("metadata", true),
        ("rate_limit", true),
        ("expires_at", true),
        ("disabled", false),
    ] {
        let fits_null = check(&doc, &patch["properties"][member], &Value::Null, member).is_ok();
        assert_eq!(
            fits_null, clearable,
            "{member}: {}",
            patch["properties"][member]
        );
    }
    let create = request_schema(&doc, "/keys", "post");
    assert_eq!(create["required"], json!(["name"]));
}

// --- The verification API's document (`keywarden::server::openapi`) ---

const COMMITTED_SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi-server.json");

fn server_document() -> Value {
    serde_json::to_value(keywarden::server::openapi()).unwrap()
}

#[tokio::test]
async fn the_committed_server_document_is_the_generated_one() {
    let generated = format!(
        "{}\n",
        keywarden::server::openapi().to_pretty_json().unwrap()
    );
    if std::env::var_os(REGENERATE).is_some() {
        std::fs::write(COMMITTED_SERVER, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED_SERVER).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi-server.json is not the document the code generates; regenerate with \
         `{REGENERATE}=1 cargo test --all-features --test openapi` and commit it"
    );
}

/// The verification router: every documented operation answers (not a 404/405), the document
/// is served without a key, and real answers fit the documented schemas.
#[tokio::test]
async fn the_verification_api_answers_as_its_document_says() {
    use keywarden::server::AuthServer;
    let doc = server_document();
    let fx = Fixture::new();
    let caller = fx
        .key(NewKey::new("gateway", "svc").scope("keys:verify"))
        .await;
    let plain = fx
        .key(NewKey::new("plain", "alice").scope("orders:read"))
        .await;
    let limited = fx
        .key(NewKey::new("limited", "bob").rate_limit("1/min".parse().unwrap()))
        .await;
    let revoked = fx.key(NewKey::new("old", "carol")).await;
    fx.manager.revoke(revoked.record.id).await.unwrap();
    let app = AuthServer::new(fx.layer.clone()).router::<()>();

    let documented = operations(&doc);
    assert_eq!(
        documented,
        [
            ("/v1/auth".to_owned(), "GET".to_owned()),
            ("/v1/keys/verify".to_owned(), "POST".to_owned()),
            ("/v1/openapi.json".to_owned(), "GET".to_owned()),
        ]
    );

    // The document, open.
    let reply = send(
        &app,
        Request::get("/v1/openapi.json")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.json(), doc);

    let verify_schema = &doc["paths"]["/v1/keys/verify"]["post"]["responses"]["200"]["content"]
        ["application/json"]["schema"];
    let request_schema = request_schema(&doc, "/v1/keys/verify", "post");
    let problem_schema = json!({"$ref": "#/components/schemas/Problem"});
    let post = |body: Value, caller: &str| {
        let app = app.clone();
        let caller = caller.to_owned();
        async move {
            send(
                &app,
                Request::post("/v1/keys/verify")
                    .header("x-api-key", caller)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
        }
    };
    let bodies = [
        json!({"key": plain.key.expose()}),
        json!({"key": plain.key.expose(), "scopes": ["orders:read"], "cost": 1}),
        json!({"key": plain.key.expose(), "scopes": ["orders:write"]}),
        json!({"key": limited.key.expose()}),
        json!({"key": limited.key.expose()}),
        json!({"key": revoked.key.expose()}),
        json!({"key": "kw_live_not-a-key"}),
    ];
    let mut codes = Vec::new();
    for body in bodies {
        check(&doc, request_schema, &body, "request").unwrap();
        let reply = post(body, caller.key.expose()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let answer = reply.json();
        check(&doc, verify_schema, &answer, "verdict").unwrap_or_else(|e| panic!("{e}: {answer}"));
        codes.push(answer["code"].as_str().unwrap_or("valid").to_owned());
    }
    assert_eq!(
        codes,
        [
            "valid",
            "valid",
            "insufficient_scope",
            "valid",
            "rate_limited",
            "revoked_key",
            "malformed_key"
        ]
    );
    // The documented codes are the layer's, all but `missing_credentials`.
    let documented: Vec<&str> = doc["components"]["schemas"]["VerdictCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = keywarden::RejectionKind::ALL
        .iter()
        .map(|k| k.code())
        .filter(|c| *c != "missing_credentials")
        .collect();
    expected.sort_unstable();
    let mut sorted = documented.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected);

    // Problems: 422, 400 and the caller's 401/403, each documented and shaped as Problem.
    for (body, caller_key, status) in [
        (json!({"key": ""}), caller.key.expose(), 422),
        (json!({"key": "k", "cost": -1}), caller.key.expose(), 422),
        (json!({"key": "k", "extra": true}), caller.key.expose(), 422),
        (json!([1]), caller.key.expose(), 400),
        (json!({"key": "k"}), "", 401),
        (json!({"key": "k"}), plain.key.expose(), 403),
    ] {
        let reply = post(body, caller_key).await;
        assert_eq!(reply.status, status, "{}", reply.text());
        let operation = &doc["paths"]["/v1/keys/verify"]["post"]["responses"];
        assert!(
            operation.get(status.to_string()).is_some(),
            "{status} is not documented"
        );
        check(&doc, &problem_schema, &reply.json(), "problem").unwrap();
    }

    // Forward auth: 200 with the documented headers, rejections with X-Keywarden-Code.
    let auth = &doc["paths"]["/v1/auth"]["get"]["responses"];
    let reply = send(
        &app,
        Request::get("/v1/auth")
            .header("x-api-key", plain.key.expose())
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    for header in auth["200"]["headers"].as_object().unwrap().keys() {
        assert!(
            reply.headers.contains_key(header.as_str()),
            "{header} missing"
        );
    }
    for (request, status) in [
        (Request::get("/v1/auth").body(Body::empty()).unwrap(), 401),
        (
            Request::post("/v1/auth")
                .header("x-api-key", plain.key.expose())
                .header("x-forwarded-method", "GET")
                .header("x-original-method", "POST")
                .body(Body::empty())
                .unwrap(),
            400,
        ),
    ] {
        let reply = send(&app, request).await;
        assert_eq!(reply.status, status, "{}", reply.text());
        assert!(auth.get(status.to_string()).is_some());
        assert!(
            reply.headers.contains_key("x-keywarden-code"),
            "{status}: no X-Keywarden-Code"
        );
        check(&doc, &problem_schema, &reply.json(), "problem").unwrap();
    }
}
