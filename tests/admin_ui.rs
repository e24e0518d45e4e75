//! The admin UI in a real browser: headless Chromium driven over WebDriver (chromedriver)
//! against the demo server (`keywarden serve`'s router) on loopback.
//!
//! Needs Debian's `chromium` and `chromium-driver` (or `KEYWARDEN_CHROMIUM` and
//! `KEYWARDEN_CHROMEDRIVER`). Without them the test is skipped with a message, except under
//! `CI=true`, where it fails. One browser session runs every scenario in turn, to keep the
//! suite's time small. Screenshots of the main screens go to `target/ui-screenshots/` (under
//! the crate root).

mod support;

#[path = "../src/bin/keywarden/demo.rs"]
mod demo;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use keywarden::{Collection, ExpiresIn, KeyManager, MemoryStore, NewKey, SecretRing};
use serde_json::{json, Value};
use support::gateway::{find_binary, free_port, serve};

const WAIT: Duration = Duration::from_secs(10);

/// chromedriver, killed (by its pid) when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver(chromedriver: &Path) -> Driver {
    let port = free_port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn connect(driver: &Driver, chromium: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    let mut args = vec![
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--lang=en-US",
    ];
    // Chromium refuses to run as root with its sandbox on (containers, CI).
    if Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0"))
    {
        args.push("--no-sandbox");
    }
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": chromium, "args": args }),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(client) => return client,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("no WebDriver session: {error}"),
        }
    }
}

fn screenshots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(client: &Client, name: &str) {
    // Let transitions (the toast) settle.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let png = client.screenshot().await.unwrap();
    std::fs::write(screenshots_dir().join(format!("{name}.png")), png).unwrap();
}

async fn wait_for(client: &Client, css: &str) -> Element {
    client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|error| panic!("waiting for {css}: {error}"))
}

/// Waits until `script` (a function body) returns true.
async fn wait_until(client: &Client, what: &str, script: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if client.execute(script, vec![]).await.unwrap() == Value::Bool(true) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(client: &Client, css: &str) -> String {
    wait_for(client, css).await.text().await.unwrap()
}

async fn click_button(client: &Client, label: &str) {
    let xpath = format!("//button[normalize-space()='{label}']");
    client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::XPath(&xpath))
        .await
        .unwrap_or_else(|error| panic!("button {label}: {error}"))
        .click()
        .await
        .unwrap();
}

async fn fill(client: &Client, css: &str, value: &str) {
    let input = wait_for(client, css).await;
    input.clear().await.unwrap();
    input.send_keys(value).await.unwrap();
}

async fn select(client: &Client, css: &str, value: &str) {
    wait_for(client, css)
        .await
        .select_by(Locator::Css(&format!("option[value='{value}']")))
        .await
        .unwrap();
}

/// The page (where the demo serves it) at `hash`.
async fn go(client: &Client, base: &str, hash: &str) {
    let page = demo::ADMIN_UI_PATH.expect("the admin-ui feature is on");
    client.goto(&format!("{base}{page}{hash}")).await.unwrap();
    watch_csp(client).await;
}

/// Records the page's Content-Security-Policy violations (until the next full load).
async fn watch_csp(client: &Client) {
    client
        .execute(
            "if (!window.__csp) { window.__csp = []; document.addEventListener(\
             'securitypolicyviolation', (e) => window.__csp.push(`${e.violatedDirective} \
             ${e.blockedURI}`)); }",
            vec![],
        )
        .await
        .unwrap();
}

/// Fails on any violation recorded since `watch_csp`: the page must work under its policy.
async fn assert_no_csp_violations(client: &Client, when: &str) {
    let seen = client
        .execute("return window.__csp || []", vec![])
        .await
        .unwrap();
    assert_eq!(seen, json!([]), "CSP violations {when}");
}

async fn sign_in(client: &Client, key: &str) {
    fill(client, "#sign-in input[name=key]", key).await;
    let remember = wait_for(client, "#remember").await;
    if !remember.is_selected().await.unwrap() {
        remember.click().await.unwrap();
    }
    click_button(client, "Sign in").await;
}

/// The API's own answer to a request, to compare with what the page shows.
async fn api(method: reqwest::Method, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .header("Authorization", format!("Bearer {key}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn rows(client: &Client) -> Vec<String> {
    let mut names = Vec::new();
    for link in client
        .find_all(Locator::Css("table.keys a.key-name"))
        .await
        .unwrap()
    {
        names.push(link.text().await.unwrap());
    }
    names
}

const XSS_NAME: &str = "<img src=x onerror=alert(1)>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_ui_in_a_real_browser() {
    let Some(chromium) = find_binary(
        "chromium",
        "KEYWARDEN_CHROMIUM",
        "chromium",
        &["/usr/lib/chromium/chromium"],
    ) else {
        return;
    };
    let Some(chromedriver) = find_binary(
        "chromedriver",
        "KEYWARDEN_CHROMEDRIVER",
        "chromium-driver",
        &["/usr/lib/chromium/chromedriver"],
    ) else {
        return;
    };

    // The demo server, as `keywarden serve` builds it, on memory.
    let secrets = SecretRing::from_strs(support::SECRET, None).unwrap();
    let layer = demo::layer_builder_with(demo::DEMO_COLLECTIONS.map(Collection::new))
        .store(Arc::new(MemoryStore::new()))
        .secrets(secrets)
        .build()
        .unwrap();
    let manager = Arc::new(KeyManager::for_layer(&layer));
    let admin = manager
        .create(NewKey::new("operator", "admin").scope("keys:admin"))
        .await
        .unwrap();
    let alice_self = manager
        .create(
            NewKey::new("alice's manager key", "alice")
                .scope("keys:self")
                .scope("read:orders"),
        )
        .await
        .unwrap();
    manager
        .create(
            NewKey::new("alice ci", "alice")
                .scope("read:orders")
                .expires_in(ExpiresIn::DAYS_30),
        )
        .await
        .unwrap();
    for i in 0..27 {
        manager
            .create(NewKey::new(format!("bob batch {i:02}"), "bob").collection("teams"))
            .await
            .unwrap();
    }
    let addr: SocketAddr = serve(demo::demo_router(layer, manager.clone())).await;
    let base = format!("http://{addr}");
    let admin_key = admin.key.expose().to_owned();

    let driver = start_driver(&chromedriver);
    let client = connect(&driver, &chromium).await;
    let outcome = tokio::spawn({
        let client = client.clone();
        async move {
            scenarios(&client, &base, &admin_key, alice_self.key.expose()).await;
        }
    })
    .await;
    let _ = client.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
    eprintln!("screenshots in {}", screenshots_dir().display());
}

async fn scenarios(client: &Client, base: &str, admin_key: &str, alice_key: &str) {
    client.set_window_size(1280, 900).await.unwrap();

    // The bare path redirects to the page, which loads without a key.
    client.goto(&format!("{base}/admin/ui")).await.unwrap();
    wait_for(client, "#sign-in").await;
    watch_csp(client).await;
    // The watcher sees a violation: an inline style attribute is refused.
    client
        .execute(
            "const probe = document.createElement('div'); probe.setAttribute('style', 'color: red'); \
             document.body.append(probe); probe.remove();",
            vec![],
        )
        .await
        .unwrap();
    wait_until(
        client,
        "the CSP probe is refused",
        "return window.__csp.length > 0",
    )
    .await;
    client.execute("window.__csp = []", vec![]).await.unwrap();
    assert_eq!(client.current_url().await.unwrap().path(), "/admin/ui/");
    assert!(text_of(client, "#sign-in").await.contains("sessionStorage"));
    screenshot(client, "01-sign-in").await;

    // A bad key: the API's own words.
    let bogus = "kw_live_not-a-key";
    let (status, problem) = api(
        reqwest::Method::GET,
        &format!("{base}/admin/keys"),
        bogus,
        None,
    )
    .await;
    assert_eq!(status, 401);
    sign_in(client, bogus).await;
    let alert = text_of(client, "#sign-in .alert.error").await;
    assert!(
        alert.contains(problem["title"].as_str().unwrap()),
        "{alert} / {problem}"
    );
    assert!(
        alert.contains(problem["detail"].as_str().unwrap()),
        "{alert} / {problem}"
    );

    // Sign in: the list, with every key (25 to a page).
    sign_in(client, admin_key).await;
    wait_for(client, "table.keys").await;
    assert_eq!(rows(client).await.len(), 25);
    let session = text_of(client, "#session-label").await;
    assert!(session.contains(&admin_key[..12]), "{session}");
    assert!(
        !session.contains(admin_key),
        "the whole key is never shown: {session}"
    );
    screenshot(client, "02-keys").await;

    // Pagination: the next page has the last 5 of 30 keys, and "Previous" comes back.
    client
        .find(Locator::Css("a[rel=next]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(
        client,
        "page 2",
        "return document.querySelectorAll('table.keys tbody tr').length === 5",
    )
    .await;
    client
        .find(Locator::Css("a[rel=prev]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(
        client,
        "page 1",
        "return document.querySelectorAll('table.keys tbody tr').length === 25",
    )
    .await;

    // Filters: subject and collection.
    fill(client, ".filters input[name=subject]", "alice").await;
    click_button(client, "Filter").await;
    wait_until(
        client,
        "alice's keys",
        "return document.querySelectorAll('table.keys tbody tr').length === 2",
    )
    .await;
    assert_eq!(rows(client).await, ["alice's manager key", "alice ci"]);
    go(client, base, "#/?collection=teams&limit=50").await;
    wait_until(
        client,
        "teams",
        "return document.querySelectorAll('table.keys tbody tr').length === 27",
    )
    .await;
    // The filters and page size come back from the URL.
    let shown = client
        .execute(
            "return [document.querySelector('.filters input[name=collection]').value, \
             document.querySelector('.filters select[name=limit]').value]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(shown, json!(["teams", "50"]));

    // Create a key with every field; the XSS name renders as text.
    go(client, base, "#/new").await;
    wait_for(client, "#create-key").await;
    fill(client, "#create-key input[name=name]", XSS_NAME).await;
    fill(
        client,
        "#create-key textarea[name=description]",
        "made in the browser test",
    )
    .await;
    fill(
        client,
        "#create-key input[name=scopes]",
        "read:orders, write:orders",
    )
    .await;
    select(client, "#create-key select[name=expiry]", "30d").await;
    fill(
        client,
        "#create-key input[name=rate_limit]",
        "100/min,burst=20",
    )
    .await;
    // The browser test's own requests come from loopback: the list lets them in.
    fill(
        client,
        "#create-key input[name=allowed_ips]",
        "127.0.0.0/8, ::1",
    )
    .await;
    fill(client, "#create-key input[name=subject]", "carol").await;
    select(client, "#create-key select[name=owner_kind]", "service").await;
    fill(
        client,
        "#create-key textarea[name=metadata]",
        r#"{"team": "billing"}"#,
    )
    .await;
    screenshot(client, "03-create").await;
    click_button(client, "Create key").await;
    let key_input = wait_for(client, "#new-key").await;
    let new_key = key_input.prop("value").await.unwrap().unwrap();
    assert!(new_key.starts_with("kw_live_"), "{new_key}");
    assert!(text_of(client, ".new-key .alert.warning")
        .await
        .contains("will not be shown again"));
    let curl = text_of(client, "#curl-lines").await;
    for form in [
        format!("Authorization: users API-Key {new_key}"),
        format!("Authorization: Bearer {new_key}"),
        format!("X-Api-Key: {new_key}"),
    ] {
        assert!(curl.contains(&form), "{curl}");
    }
    assert!(curl.contains(&format!("{base}/whoami")), "{curl}");
    screenshot(client, "04-new-key").await;

    // The new key authenticates with each header form.
    let (status, who) = api(
        reqwest::Method::GET,
        &format!("{base}/whoami"),
        &new_key,
        None,
    )
    .await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who["key_name"], XSS_NAME);
    assert_eq!(who["subject"], "carol");
    let key_id = who["key_id"].as_str().unwrap().to_owned();
    for (name, value) in [
        ("authorization", format!("users API-Key {new_key}")),
        ("x-api-key", new_key.clone()),
    ] {
        let status = reqwest::Client::new()
            .get(format!("{base}/whoami"))
            .header(name, value)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{name}");
    }

    // Reload: the key is gone, from the page and from the tab's storage.
    assert_no_csp_violations(client, "signing in, listing and creating").await;
    client.refresh().await.unwrap();
    watch_csp(client).await;
    wait_for(client, "#create-key").await;
    assert!(client.find(Locator::Css("#new-key")).await.is_err());
    assert!(!client.source().await.unwrap().contains(&new_key));
    let stored = client
        .execute("return JSON.stringify(sessionStorage) + document.cookie + JSON.stringify(localStorage)", vec![])
        .await
        .unwrap();
    assert!(!stored.as_str().unwrap().contains(&new_key), "{stored}");

    // The key's page: the name is text, not an element.
    go(client, base, &format!("#/keys/{key_id}")).await;
    let title = text_of(client, "h1.key-title").await;
    assert!(title.contains(XSS_NAME), "{title}");
    assert!(client
        .find_all(Locator::Css("img[src=x]"))
        .await
        .unwrap()
        .is_empty());
    let details = text_of(client, "dl.details").await;
    for expected in [
        "carol",
        "service",
        "100/min,burst=20",
        "127.0.0.0/8, ::1/128",
        "write:orders",
        "\"team\": \"billing\"",
    ] {
        assert!(details.contains(expected), "{expected} in {details}");
    }
    // Until the server has them, the usage and audit sections say so.
    wait_until(client, "usage and audit sections", "return !document.querySelector('#usage').textContent.includes('Loading') && !document.querySelector('#audit').textContent.includes('Loading')").await;
    let usage = text_of(client, "#usage").await;
    let audit = text_of(client, "#audit").await;
    let (usage_status, _) = api(
        reqwest::Method::GET,
        &format!("{base}/admin/keys/{key_id}/usage"),
        admin_key,
        None,
    )
    .await;
    if usage_status == 404 {
        assert!(usage.contains("not available in this version"), "{usage}");
        assert!(audit.contains("not available in this version"), "{audit}");
    }
    screenshot(client, "05-key").await;

    // The list shows the name as text too.
    go(client, base, "#/?subject=carol").await;
    wait_until(
        client,
        "carol's key",
        "return document.querySelectorAll('table.keys tbody tr').length === 1",
    )
    .await;
    assert_eq!(rows(client).await, [XSS_NAME]);
    assert!(client
        .find_all(Locator::Css("img[src=x]"))
        .await
        .unwrap()
        .is_empty());

    // Edit: a new name and scopes.
    go(client, base, &format!("#/keys/{key_id}")).await;
    wait_for(client, "dl.details").await;
    click_button(client, "Edit").await;
    fill(client, "#confirm input[name=name]", "carol's worker").await;
    fill(client, "#confirm input[name=scopes]", "read:orders").await;
    screenshot(client, "06-edit").await;
    client
        .find(Locator::Id("confirm-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(
        client,
        "renamed",
        "return document.querySelector('h1.key-title')?.textContent.includes(\"carol's worker\")",
    )
    .await;
    let (_, view) = api(
        reqwest::Method::GET,
        &format!("{base}/admin/keys/{key_id}"),
        admin_key,
        None,
    )
    .await;
    assert_eq!(view["name"], "carol's worker");
    assert_eq!(view["scopes"], json!(["read:orders"]));

    // Disable, then enable, each confirmed.
    click_button(client, "Disable").await;
    wait_for(client, "#confirm[open]").await;
    screenshot(client, "07-confirm").await;
    client
        .find(Locator::Id("confirm-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(client, "h1.key-title .state-disabled").await;
    let (status, _) = api(
        reqwest::Method::GET,
        &format!("{base}/whoami"),
        &new_key,
        None,
    )
    .await;
    assert_eq!(status, 401);
    click_button(client, "Enable").await;
    client
        .find(Locator::Id("confirm-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(client, "h1.key-title .state-active").await;

    // Cancel leaves the key alone; revoke (confirmed) ends it.
    click_button(client, "Revoke").await;
    wait_for(client, "#confirm[open]").await;
    client
        .find(Locator::Id("confirm-cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until(
        client,
        "dialog closed",
        "return !document.querySelector('#confirm').open",
    )
    .await;
    let (status, _) = api(
        reqwest::Method::GET,
        &format!("{base}/whoami"),
        &new_key,
        None,
    )
    .await;
    assert_eq!(status, 200);
    click_button(client, "Revoke").await;
    client
        .find(Locator::Id("confirm-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(client, "h1.key-title .state-revoked").await;
    let (status, problem) = api(
        reqwest::Method::GET,
        &format!("{base}/whoami"),
        &new_key,
        None,
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (401, Some("revoked_key"))
    );

    // Delete (confirmed; Escape first cancels): back to the list, and the key is gone.
    click_button(client, "Delete").await;
    wait_for(client, "#confirm[open]").await;
    client
        .active_element()
        .await
        .unwrap()
        .send_keys("\u{E00C}")
        .await
        .unwrap();
    wait_until(
        client,
        "Escape closes the dialog",
        "return !document.querySelector('#confirm').open",
    )
    .await;
    wait_for(client, "h1.key-title").await;
    click_button(client, "Delete").await;
    client
        .find(Locator::Id("confirm-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(client, "form.filters").await;
    let (status, problem) = api(
        reqwest::Method::GET,
        &format!("{base}/admin/keys/{key_id}"),
        admin_key,
        None,
    )
    .await;
    assert_eq!((status, problem["code"].as_str()), (404, Some("not_found")));

    // Rotate another key: the new one is shown once and works; the old one has a grace period.
    go(client, base, "#/?subject=alice").await;
    wait_until(
        client,
        "alice's keys",
        "return document.querySelectorAll('table.keys tbody tr').length === 2",
    )
    .await;
    client
        .find(Locator::LinkText("alice ci"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    click_button(client, "Rotate").await;
    select(client, "#confirm select[name=grace]", "1h").await;
    client
        .find(Locator::Id("confirm-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rotated = wait_for(client, "#new-key")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    let (status, who) = api(
        reqwest::Method::GET,
        &format!("{base}/whoami"),
        &rotated,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(who["key_name"], "alice ci");

    // A bad value: the API's error, as the API words it.
    go(client, base, "#/new").await;
    fill(client, "#create-key input[name=name]", "bad").await;
    fill(client, "#create-key input[name=rate_limit]", "lots").await;
    click_button(client, "Create key").await;
    let alert = text_of(client, "#create-key .alert.error").await;
    let (status, problem) = api(
        reqwest::Method::POST,
        &format!("{base}/admin/keys"),
        admin_key,
        Some(json!({"name": "bad", "rate_limit": "lots"})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        alert.contains(problem["title"].as_str().unwrap()),
        "{alert} / {problem}"
    );
    assert!(
        alert.contains(problem["detail"].as_str().unwrap()),
        "{alert} / {problem}"
    );
    screenshot(client, "08-error").await;

    credits(client, base, admin_key).await;

    // The usage chart, drawn from injected buckets (the shape `GET /keys/{id}/usage` answers).
    let drawn = client
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
            import(new URL("chart.js", location.href)).then(({ usageChart }) => {
              const start = Date.parse("2030-01-01T00:00:00Z");
              const buckets = Array.from({ length: 24 }, (_, i) => ({
                start: new Date(start + i * 3600e3).toISOString(),
                accepted: Math.round(40 + 30 * Math.sin(i / 3)),
                rate_limited: i % 5 === 0 ? 6 : 0,
                expired: i === 20 ? 9 : 0,
              }));
              const section = document.createElement("section");
              section.className = "card";
              section.id = "chart-test";
              const h2 = document.createElement("h2");
              h2.textContent = "Usage (injected data)";
              section.append(h2, usageChart(buckets, { granularity: "hour" }));
              document.getElementById("main").replaceChildren(section);
              done({
                accepted: section.querySelectorAll("rect.accepted").length,
                rejected: section.querySelectorAll("rect.rejected").length,
                caption: section.querySelector("figcaption").textContent,
                label: section.querySelector("svg").getAttribute("aria-label"),
              });
            }, (error) => done({ error: String(error) }));"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(drawn["accepted"], 24, "{drawn}");
    assert_eq!(drawn["rejected"], 5, "{drawn}");
    let accepted: i64 = (0..24)
        .map(|i: i32| (40.0 + 30.0 * (f64::from(i) / 3.0).sin()).round() as i64)
        .sum();
    assert!(
        drawn["caption"]
            .as_str()
            .unwrap()
            .contains(&format!("{accepted} accepted")),
        "{drawn}"
    );
    assert!(
        drawn["caption"].as_str().unwrap().contains("39 rejected"),
        "{drawn}"
    );
    screenshot(client, "09-chart").await;
    assert_no_csp_violations(client, "on the key page, in dialogs and drawing the chart").await;

    // keys:self: only its owner's keys.
    click_button(client, "Sign out").await;
    sign_in(client, alice_key).await;
    wait_for(client, "table.keys").await;
    wait_until(
        client,
        "alice's list",
        "return document.querySelectorAll('table.keys tbody tr').length === 3",
    )
    .await;
    let names = rows(client).await;
    assert_eq!(names, ["alice's manager key", "alice ci", "alice ci"]);
    screenshot(client, "10-self").await;
    // Asking for someone else's keys shows nothing of theirs.
    go(client, base, "#/?subject=bob").await;
    wait_for(client, "p.empty").await;

    // A narrow screen: the list and a key's page stay readable.
    client.set_window_size(390, 844).await.unwrap();
    go(client, base, "#/").await;
    wait_until(
        client,
        "alice's list",
        "return document.querySelectorAll('table.keys tbody tr').length === 3",
    )
    .await;
    let overflow = client
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        overflow,
        Value::Bool(true),
        "no horizontal scrolling on a phone"
    );
    screenshot(client, "11-narrow-keys").await;
    client
        .find(Locator::LinkText("alice's manager key"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(client, "dl.details").await;
    screenshot(client, "12-narrow-key").await;
    client.set_window_size(1280, 900).await.unwrap();

    // Keyboard: the sign-in form works without a mouse.
    click_button(client, "Sign out").await;
    let input = wait_for(client, "#sign-in input[name=key]").await;
    assert_eq!(
        client.active_element().await.unwrap().element_id(),
        input.element_id(),
        "the key field has the focus"
    );
    input
        .send_keys(&format!("{admin_key}\u{E007}"))
        .await
        .unwrap();
    wait_for(client, "table.keys").await;
    assert_no_csp_violations(client, "as keys:self, on a narrow screen").await;
}

/// The text of the key page's detail `term` ("Credits", "Refill").
async fn detail_of(client: &Client, term: &str) -> String {
    let script = format!(
        "const dt = [...document.querySelectorAll('dl.details > dt')].find((d) => d.textContent === {term:?}); \
         return dt ? dt.nextElementSibling.textContent : null"
    );
    match client.execute(&script, vec![]).await.unwrap() {
        Value::String(text) => text,
        other => panic!("no detail {term}: {other}"),
    }
}

async fn confirm_ok(client: &Client) {
    client
        .find(Locator::Id("confirm-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Credits through the forms: set at creation with a refill, shown on the key's page and in
/// the list, lowered and made unlimited by editing; a bad refill shows the API's error.
async fn credits(client: &Client, base: &str, admin_key: &str) {
    // From elsewhere: going to the page at its own hash would keep the last form's values.
    go(client, base, "#/").await;
    wait_for(client, "table.keys").await;
    go(client, base, "#/new").await;
    fill(client, "#create-key input[name=name]", "metered").await;
    fill(client, "#create-key input[name=credits]", "50").await;
    fill(client, "#create-key input[name=refill]", "10/day").await;
    screenshot(client, "13-create-credits").await;
    click_button(client, "Create key").await;
    wait_for(client, "#new-key").await;
    // Not used: a request would lease credits, and the page shows what the store holds.
    click_button(client, "I have stored it — done").await;
    wait_for(client, "dl.details").await;
    let url = client.current_url().await.unwrap();
    let key_id = url
        .fragment()
        .unwrap()
        .trim_start_matches("/keys/")
        .to_owned();
    let view_url = format!("{base}/admin/keys/{key_id}");
    let (_, view) = api(reqwest::Method::GET, &view_url, admin_key, None).await;
    assert_eq!(
        (&view["credits"], &view["refill"]),
        (&json!(50), &json!("10/day"))
    );
    assert_eq!(detail_of(client, "Credits").await, "50");
    assert!(detail_of(client, "Refill").await.starts_with("10/day"));
    screenshot(client, "14-key-credits").await;

    // The list: credits left, the refill under them.
    go(client, base, "#/?subject=admin").await;
    wait_for(client, "table.keys").await;
    let cell = client
        .execute(
            "const link = [...document.querySelectorAll('table.keys a.key-name')].find((a) => a.textContent === 'metered'); \
             return link.closest('tr').querySelector('td[data-label=Credits]').innerText",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(cell, json!("50\n10/day"));
    screenshot(client, "15-keys-credits").await;

    // Edit: a new balance; the refill is left alone.
    go(client, base, &format!("#/keys/{key_id}")).await;
    wait_for(client, "dl.details").await;
    click_button(client, "Edit").await;
    fill(client, "#confirm input[name=credits]", "5").await;
    screenshot(client, "16-edit-credits").await;
    confirm_ok(client).await;
    wait_until(
        client,
        "5 credits",
        "const dt = [...document.querySelectorAll('dl.details > dt')].find((d) => d.textContent === 'Credits'); \
         return dt?.nextElementSibling.textContent === '5'",
    )
    .await;
    let (_, view) = api(reqwest::Method::GET, &view_url, admin_key, None).await;
    assert_eq!(
        (&view["credits"], &view["refill"]),
        (&json!(5), &json!("10/day"))
    );

    // A bad refill in the edit dialog: the API's words, and nothing changed.
    click_button(client, "Edit").await;
    fill(client, "#confirm input[name=refill]", "5/fortnight").await;
    confirm_ok(client).await;
    let alert = text_of(client, "#key-status .alert.error").await;
    let (status, problem) = api(
        reqwest::Method::PATCH,
        &view_url,
        admin_key,
        Some(json!({"refill": "5/fortnight"})),
    )
    .await;
    assert_eq!(
        (status, problem["errors"][0]["field"].as_str()),
        (422, Some("refill"))
    );
    assert!(
        alert.contains(problem["detail"].as_str().unwrap()),
        "{alert} / {problem}"
    );
    screenshot(client, "17-edit-refill-error").await;

    // Unlimited: credits and refill both go.
    click_button(client, "Edit").await;
    wait_for(client, "#credits-unlimited")
        .await
        .click()
        .await
        .unwrap();
    confirm_ok(client).await;
    wait_until(
        client,
        "unlimited",
        "const dt = [...document.querySelectorAll('dl.details > dt')].find((d) => d.textContent === 'Credits'); \
         return dt?.nextElementSibling.textContent === 'unlimited'",
    )
    .await;
    assert_eq!(detail_of(client, "Refill").await, "none");
    let (_, view) = api(reqwest::Method::GET, &view_url, admin_key, None).await;
    assert_eq!(
        (&view["credits"], &view["refill"]),
        (&Value::Null, &Value::Null)
    );

    // A bad refill at creation: the API's error, and the field marked.
    go(client, base, "#/").await;
    wait_for(client, "table.keys").await;
    go(client, base, "#/new").await;
    fill(client, "#create-key input[name=name]", "bad refill").await;
    // Text the number input cannot read never reaches the API: the page says so itself.
    fill(client, "#create-key input[name=credits]", "1e").await;
    click_button(client, "Create key").await;
    let alert = text_of(client, "#create-key .alert.error").await;
    assert!(alert.contains("Credits is not a number"), "{alert}");
    fill(client, "#create-key input[name=credits]", "").await;
    fill(client, "#create-key input[name=refill]", "5/fortnight").await;
    click_button(client, "Create key").await;
    let alert = text_of(client, "#create-key .alert.error").await;
    let (status, problem) = api(
        reqwest::Method::POST,
        &format!("{base}/admin/keys"),
        admin_key,
        Some(json!({"name": "bad refill", "refill": "5/fortnight"})),
    )
    .await;
    assert_eq!(
        (status, problem["errors"][0]["field"].as_str()),
        (422, Some("refill"))
    );
    assert!(
        alert.contains(problem["title"].as_str().unwrap()),
        "{alert} / {problem}"
    );
    assert!(
        alert.contains(problem["detail"].as_str().unwrap()),
        "{alert} / {problem}"
    );
    let marked = client
        .execute(
            "return [...document.querySelectorAll('#create-key [aria-invalid=true]')].map((c) => c.name)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(marked, json!(["refill"]));
    screenshot(client, "18-create-refill-error").await;
}
