//! What the commands print: text for people, JSON (`--json`) in the library's key views.

use keywarden::{
    manage::CreatedKeyView, manage::KeyPageView, manage::KeyView, secret::SecretId, store::KeyPage,
    store::KeyRecord, store::SecretRetirement, CreatedKey,
};
use serde::Serialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

const ONCE_WARNING: &str = "Store this key now: it will not be shown again.";

/// How many key ids a text message lists before "and N more".
const LISTED_IDS: usize = 10;

pub(crate) fn id_list(ids: &[Uuid]) -> String {
    let mut text = ids
        .iter()
        .take(LISTED_IDS)
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > LISTED_IDS {
        text.push_str(&format!(" and {} more", ids.len() - LISTED_IDS));
    }
    text
}

pub(crate) fn print_retirement(id: SecretId, outcome: &SecretRetirement, out: Output) {
    if out.json {
        out.print_json(&json!({
            "secret_id": id.to_string(),
            "retired": true,
            "dropped_digests": outcome.dropped,
            "affected_keys": outcome.affected.len(),
            "revoked_keys": outcome.unmigrated,
        }));
        return;
    }
    println!(
        "retired secret {id}: dropped {} digest(s) of {} key(s)",
        outcome.dropped,
        outcome.affected.len()
    );
    if !outcome.unmigrated.is_empty() {
        println!(
            "revoked {} key(s) that had no other digest: {}",
            outcome.unmigrated.len(),
            id_list(&outcome.unmigrated)
        );
    }
}

/// A usage report: the buckets with any request, and the totals.
pub(crate) fn print_usage(report: &keywarden::manage::UsageReport, out: Output) {
    if out.json {
        out.print(report);
        return;
    }
    let fmt = |at: OffsetDateTime| {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    println!(
        "{:<20} {:>9} {:>9} {:>12} {:>18} {:>8} {:>8} {:>8} {:>14} {:>14} {:>6}",
        "from",
        "accepted",
        "rejected",
        "rate_limited",
        "insufficient_scope",
        "expired",
        "revoked",
        "invalid",
        "ip_not_allowed",
        "usage_exceeded",
        "other"
    );
    for b in report
        .buckets
        .iter()
        .filter(|b| b.accepted + b.rejected > 0)
    {
        println!(
            "{:<20} {:>9} {:>9} {:>12} {:>18} {:>8} {:>8} {:>8} {:>14} {:>14} {:>6}",
            fmt(b.start),
            b.accepted,
            b.rejected,
            b.rate_limited,
            b.insufficient_scope,
            b.expired,
            b.revoked,
            b.invalid,
            b.ip_not_allowed,
            b.usage_exceeded,
            b.other + b.malformed
        );
    }
    let t = &report.total;
    println!(
        "total {} accepted, {} rejected ({} rate limited, {} insufficient scope, {} expired, \
         {} revoked, {} invalid, {} not from an allowed address, {} out of credits, {} other) \
         from {} to {} \
         (hours with requests only; --json \
         lists every bucket)",
        t.accepted,
        t.rejected,
        t.rate_limited,
        t.insufficient_scope,
        t.expired,
        t.revoked,
        t.invalid,
        t.ip_not_allowed,
        t.usage_exceeded,
        t.other + t.malformed,
        fmt(report.since),
        fmt(report.until)
    );
}

/// Text or JSON, by `--json`.
#[derive(Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
}

impl Output {
    pub(crate) fn print_json(self, value: &Value) {
        self.print(value);
    }

    /// Pretty JSON on stdout.
    fn print(self, value: &impl Serialize) {
        match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("error: cannot print JSON: {error}"),
        }
    }
}

fn short_time(at: Option<OffsetDateTime>, none: &str) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]Z");
    match at {
        Some(at) => at
            .checked_to_offset(time::UtcOffset::UTC)
            .unwrap_or(at)
            .format(&format)
            .unwrap_or_else(|_| at.to_string()),
        None => none.to_owned(),
    }
}

pub(crate) fn print_created(created: &CreatedKey, rotated: Option<&KeyRecord>, out: Output) {
    let record = &created.record;
    if out.json {
        /// The old key of a rotation: the one it replaced, and when that one stops working.
        #[derive(Serialize)]
        struct Rotated {
            old_key_id: Uuid,
            #[serde(with = "time::serde::rfc3339::option")]
            old_key_expires_at: Option<OffsetDateTime>,
        }
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            created: CreatedKeyView<'a>,
            #[serde(flatten)]
            rotated: Option<Rotated>,
        }
        out.print(&Shown {
            created: CreatedKeyView::new(created, OffsetDateTime::now_utc()),
            rotated: rotated.map(|old| Rotated {
                old_key_id: old.id,
                old_key_expires_at: old.expires_at,
            }),
        });
        eprintln!("warning: {ONCE_WARNING}");
        return;
    }
    match rotated {
        Some(old) => {
            println!(
                "Rotated key {} into {} ({:?}).",
                old.id, record.id, record.name
            );
            println!(
                "The old key keeps working until {}.",
                short_time(old.expires_at, "it expires")
            );
            if old.credits.is_some() {
                println!(
                    "Its credits moved to the new key: until then the old key answers \
                     usage_exceeded."
                );
            }
        }
        None => println!(
            "Created key {} ({:?}) for {} {:?} in collection {:?}, expires {}.",
            record.id,
            record.name,
            record.owner_kind,
            record.subject,
            record.collection,
            short_time(record.expires_at, "never")
        ),
    }
    if !record.allowed_ips.is_empty() {
        let networks: Vec<String> = record.allowed_ips.iter().map(ToString::to_string).collect();
        println!("Accepted only from {}.", networks.join(", "));
    }
    if let Some(credits) = record.credits {
        println!("Credits: {}.", credits_words(credits));
    }
    println!();
    println!("    {}", created.key.expose());
    println!();
    println!("{ONCE_WARNING}");
}

pub(crate) fn print_record(record: &KeyRecord, out: Output) {
    let now = OffsetDateTime::now_utc();
    if out.json {
        out.print(&KeyView::new(record, now));
        return;
    }
    let dash = || "-".to_owned();
    let rows = [
        ("id", record.id.to_string()),
        ("name", record.name.clone()),
        (
            "description",
            record.description.clone().unwrap_or_else(dash),
        ),
        ("display start", format!("{}...", record.display_start)),
        ("collection", record.collection.clone()),
        ("subject", record.subject.clone()),
        ("owner kind", record.owner_kind.to_string()),
        (
            "scopes",
            if record.scopes.is_empty() {
                dash()
            } else {
                record.scopes.join(", ")
            },
        ),
        ("environment", record.environment.clone()),
        (
            "read only",
            if record.read_only { "yes" } else { "no" }.into(),
        ),
        ("state", record.state(now).as_str().into()),
        (
            "rate limit",
            record.rate_limit.map_or_else(dash, |p| p.to_string()),
        ),
        (
            "allowed ips",
            if record.allowed_ips.is_empty() {
                "any".to_owned()
            } else {
                record
                    .allowed_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "credits",
            record
                .credits
                .map_or_else(|| "unlimited".to_owned(), |c| c.remaining.to_string()),
        ),
        (
            "refill",
            record
                .credits
                .and_then(|c| c.refill)
                .map_or_else(dash, |r| r.to_string()),
        ),
        ("owner limits", owner_limits(record)),
        ("metadata", record.metadata.to_string()),
        ("created", short_time(Some(record.created_at), "")),
        ("updated", short_time(Some(record.updated_at), "")),
        ("expires", short_time(record.expires_at, "never")),
        ("last used", short_time(record.last_used_at, "never")),
        ("uses", record.use_count.to_string()),
        ("revoked", short_time(record.revoked_at, "-")),
        (
            "rotated from",
            record.rotated_from.map_or_else(dash, |id| id.to_string()),
        ),
    ];
    for (label, value) in rows {
        println!("{label:<14}{value}");
    }
}

/// A balance and its refill as people read them: `500`, `500, set to 1000 again every day`.
pub(crate) fn credits_words(credits: keywarden::store::Credits) -> String {
    match credits.refill {
        Some(refill) => format!(
            "{}, set to {} again every {}",
            credits.remaining,
            refill.amount(),
            refill.to_string().split_once('/').map_or("", |(_, p)| p)
        ),
        None => credits.remaining.to_string(),
    }
}

/// What the key's owner's policy adds (`keywarden owners show` has the balance).
fn owner_limits(record: &KeyRecord) -> String {
    let owner = &record.owner;
    let mut parts = Vec::new();
    if let Some(rate) = owner.rate_limit {
        parts.push(format!("rate limit {rate}"));
    }
    if owner.credits.is_some() {
        parts.push("shared credits".to_owned());
    }
    if parts.is_empty() {
        return "-".to_owned();
    }
    format!(
        "{} (shared with the owner's other keys: keywarden owners show {} --collection {})",
        parts.join(", "),
        record.subject,
        record.collection
    )
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(max - 1).collect();
        short.push('…');
        short
    }
}

pub(crate) fn print_page(page: &KeyPage, now: OffsetDateTime, out: Output) {
    if out.json {
        out.print(&KeyPageView::new(page, now));
        return;
    }
    if page.items.is_empty() {
        println!("no keys");
        // A page of only unreadable rows (skipped by the store) may still have a next one.
        if let Some(cursor) = page.next_cursor {
            println!("more keys: --after {cursor}");
        }
        return;
    }
    let header = [
        "ID",
        "NAME",
        "DISPLAY",
        "COLLECTION",
        "SUBJECT",
        "STATE",
        "EXPIRES",
        "LAST USED",
        "CREDITS",
    ];
    let rows: Vec<[String; 9]> = page
        .items
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                truncate(&r.name, 32),
                format!("{}...", r.display_start),
                truncate(&r.collection, 20),
                truncate(&r.subject, 24),
                r.state(now).as_str().to_owned(),
                short_time(r.expires_at, "never"),
                short_time(r.last_used_at, "never"),
                r.credits
                    .map_or_else(|| "-".to_owned(), |c| c.remaining.to_string()),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
            }
        }
        println!("{}", text.trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if let Some(cursor) = page.next_cursor {
        println!("more keys: --after {cursor}");
    }
}
