//! Strapi's per-action permissions for an axum app that mirrors a Strapi content API: each
//! REST route requires the scope of its Strapi action UID, as Strapi's own content API checks
//! every route's action for every token.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;

use crate::scope::RequireScopeLayer;

/// The routes of a Strapi content API and the actions they map to, as a
/// [`RequireScopeLayer`]: an app that mirrors a Strapi content API gets Strapi's authorization
/// by adding one layer.
///
/// Strapi's REST conventions, for a collection type with plural name `articles` and UID
/// `api::article.article` (the plural name is the URL segment, the UID the action prefix):
///
/// | request | action (the scope required) |
/// | --- | --- |
/// | `GET /api/articles` | `api::article.article.find` |
/// | `GET /api/articles/{id}` | `api::article.article.findOne` |
/// | `POST /api/articles` | `api::article.article.create` |
/// | `PUT /api/articles/{id}` | `api::article.article.update` |
/// | `DELETE /api/articles/{id}` | `api::article.article.delete` |
///
/// and for a single type `homepage` (`api::homepage.homepage`): `GET /api/homepage` → `find`,
/// `PUT` → `update`, `DELETE` → `delete`. `HEAD` counts as `GET`. Any other method or path is
/// refused with 403 (Strapi answers such routes 404 or 405; here nothing unmapped passes).
///
/// What a Strapi token may do then follows from its scopes ([`StrapiStore`](super::StrapiStore)):
/// a `full-access` token (`*`) every action, a `read-only` token every action but only with
/// safe methods (so `find` and `findOne`), a `custom` token exactly its permissions' action
/// UIDs. keywarden's own keys work too, with the action UIDs as scopes, or `api::*` (every
/// content-API action: a `prefix:*` wildcard's prefix ends with `:`) or `*`. There is no
/// per-type wildcard: `api::article.*` is a literal scope, not a grant.
///
/// ```
/// use axum::{routing::get, Router};
/// use keywarden::interop::StrapiContentApi;
///
/// let actions = StrapiContentApi::new("/api")
///     .collection_type("articles", "api::article.article")
///     .single_type("homepage", "api::homepage.homepage");
/// let app: Router = Router::new()
///     .route("/api/articles", get(|| async { "[]" }).post(|| async { "created" }))
///     .route("/api/homepage", get(|| async { "home" }))
///     .route_layer(actions.layer());
/// // ...then `.layer(api_key_layer)` last, so the key is checked first.
/// # let _ = app;
/// ```
#[derive(Debug, Clone, Default)]
pub struct StrapiContentApi {
    prefix: String,
    /// URL segment → (UID, whether it is a collection type).
    types: HashMap<String, (String, bool)>,
}

impl StrapiContentApi {
    /// A content API under `prefix` (Strapi's default is `/api`; `""` when the layer sits
    /// inside an axum `nest("/api", ..)`, which removes the prefix from the path it sees).
    pub fn new(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
            types: HashMap::new(),
        }
    }

    /// A collection type: its plural name (the URL segment) and its UID
    /// (`api::article.article`).
    #[must_use]
    pub fn collection_type(mut self, plural: impl Into<String>, uid: impl Into<String>) -> Self {
        self.types.insert(plural.into(), (uid.into(), true));
        self
    }

    /// A single type: its singular name (the URL segment) and its UID
    /// (`api::homepage.homepage`).
    #[must_use]
    pub fn single_type(mut self, singular: impl Into<String>, uid: impl Into<String>) -> Self {
        self.types.insert(singular.into(), (uid.into(), false));
        self
    }

    /// The action a request maps to (`api::article.article.findOne`), if any.
    pub fn action(&self, method: &Method, path: &str) -> Option<String> {
        let rest = path.strip_prefix(self.prefix.as_str())?;
        let rest = rest.strip_prefix('/')?;
        let (segment, id) = match rest.split_once('/') {
            Some((segment, id)) => (segment, Some(id)),
            None => (rest, None),
        };
        let (uid, collection) = self.types.get(segment)?;
        let action = match (*collection, id, method.as_str()) {
            // One more segment: an entry's id. Strapi's ids and documentIds are letters and
            // digits; a dot segment, an encoded character or a backslash is no id, and could
            // mean another resource to a handler that forwards the decoded id.
            (true, Some(id), _) if !is_id(id) => return None,
            (true, None, "GET" | "HEAD") => "find",
            (true, None, "POST") => "create",
            (true, Some(_), "GET" | "HEAD") => "findOne",
            (true, Some(_), "PUT") => "update",
            (true, Some(_), "DELETE") => "delete",
            (false, None, "GET" | "HEAD") => "find",
            (false, None, "PUT") => "update",
            (false, None, "DELETE") => "delete",
            _ => return None,
        };
        Some(format!("{uid}.{action}"))
    }

    /// The layer: each request requires the scope of its action; requests that map to none
    /// are refused with 403. Put it inside the [`ApiKeyLayer`](crate::ApiKeyLayer) (in axum,
    /// `.route_layer(..)`, then the key layer with `.layer(..)`).
    pub fn layer(self) -> RequireScopeLayer {
        let api = Arc::new(self);
        RequireScopeLayer::per_request(move |method, path| api.action(method, path).map(Arc::from))
    }
}

/// A plausible entry id: 1 to 128 bytes of letters, digits, `-` and `_`.
fn is_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> StrapiContentApi {
        StrapiContentApi::new("/api/")
            .collection_type("articles", "api::article.article")
            .single_type("homepage", "api::homepage.homepage")
    }

    #[test]
    fn rest_conventions_map_to_actions() {
        let api = api();
        let action = |method: Method, path: &str| api.action(&method, path);
        let article = |a: &str| Some(format!("api::article.article.{a}"));
        assert_eq!(action(Method::GET, "/api/articles"), article("find"));
        assert_eq!(action(Method::HEAD, "/api/articles"), article("find"));
        assert_eq!(action(Method::POST, "/api/articles"), article("create"));
        assert_eq!(action(Method::GET, "/api/articles/7"), article("findOne"));
        assert_eq!(
            action(Method::PUT, "/api/articles/abc123"),
            article("update")
        );
        assert_eq!(action(Method::DELETE, "/api/articles/7"), article("delete"));
        let home = |a: &str| Some(format!("api::homepage.homepage.{a}"));
        assert_eq!(action(Method::GET, "/api/homepage"), home("find"));
        assert_eq!(action(Method::PUT, "/api/homepage"), home("update"));
        assert_eq!(action(Method::DELETE, "/api/homepage"), home("delete"));
    }

    #[test]
    fn anything_else_maps_to_nothing() {
        let api = api();
        for (method, path) in [
            (Method::PATCH, "/api/articles/7"),
            (Method::POST, "/api/articles/7"),
            (Method::PUT, "/api/articles"),
            (Method::DELETE, "/api/articles"),
            (Method::GET, "/api/articles/"),
            (Method::GET, "/api/articles/7/comments"),
            (Method::GET, "/api/articles//7"),
            (Method::GET, "/api/articles/.."),
            (Method::GET, "/api/articles/..%2F..%2Froles"),
            (Method::DELETE, "/api/articles/7%00"),
            (Method::GET, "/api/articles/a\\b"),
            (Method::GET, "/api/comments"),
            (Method::GET, "/apix/articles"),
            (Method::GET, "/articles"),
            (Method::POST, "/api/homepage"),
            (Method::GET, "/api/homepage/1"),
            (Method::GET, "/api"),
        ] {
            assert_eq!(api.action(&method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn an_empty_prefix_for_nested_routers() {
        let api = StrapiContentApi::new("").collection_type("articles", "api::article.article");
        assert_eq!(
            api.action(&Method::GET, "/articles/1"),
            Some("api::article.article.findOne".into())
        );
        assert_eq!(api.action(&Method::GET, "/api/articles/1"), None);
    }
}
