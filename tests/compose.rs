//! keywarden in front of another bearer layer: both kinds of clients succeed.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/compose_bearer.rs"]
mod example;

mod support;

use keywarden::NewKey;
use support::get_with;

#[tokio::test]
async fn api_keys_and_foreign_bearer_tokens_both_work() {
    let (app, manager) = example::app(support::SECRET);
    let key = manager
        .create(NewKey::new("script", "alice"))
        .await
        .unwrap()
        .key;

    let bearer = format!("Bearer {}", key.expose());
    let reply = get_with(&app, "/hello", &[("authorization", bearer.as_bytes())]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.text()),
        (200, "hello alice (API key script)".into())
    );

    let reply = get_with(&app, "/hello", &[("x-api-key", key.expose().as_bytes())]).await;
    assert_eq!(reply.status, 200);

    let reply = get_with(
        &app,
        "/hello",
        &[("authorization", b"Bearer sess_browser_token")],
    )
    .await;
    assert_eq!(
        (reply.status.as_u16(), reply.text()),
        (200, "hello bob (session)".into())
    );

    // Unknown to both layers: the session layer answers.
    let reply = get_with(&app, "/hello", &[("authorization", b"Bearer sess_unknown")]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.text(), "sign in or send an API key");

    // A keywarden-format key that is bad is rejected by keywarden, not passed on.
    let reply = get_with(
        &app,
        "/hello",
        &[("authorization", b"Bearer kw_live_tampered")],
    )
    .await;
    assert_eq!(reply.code(), "malformed_key");
    let revoked = manager.create(NewKey::new("old", "carol")).await.unwrap();
    manager.revoke(revoked.record.id).await.unwrap();
    let bearer = format!("Bearer {}", revoked.key.expose());
    let reply = get_with(&app, "/hello", &[("authorization", bearer.as_bytes())]).await;
    assert_eq!(reply.code(), "revoked_key");
}
