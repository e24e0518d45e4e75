//! The `audit` commands: read, check and prune the tamper-evident audit log.

use clap::Subcommand;
use keywarden::audit::{AuditAction, AuditEvent, AuditQuery, ChainHead};
use keywarden::manage::parse_duration;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::cli::cli_manager;
use crate::output::Output;
use crate::{Context, Failure};

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// List audit events, oldest first.
    List {
        /// Only events about this key.
        #[arg(long = "key", value_name = "ID", value_parser = parse_id)]
        key_id: Option<Uuid>,
        /// Only events by this actor: a kind (cli, key, sql, other) or one actor
        /// (key:<id>, sql:<role>, other:<name>).
        #[arg(long, value_parser = parse_actor)]
        actor: Option<String>,
        /// Only this action (key.created, key.updated, key.revoked, key.disabled,
        /// key.enabled, key.rotated, key.deleted, key.revealed, secret.retired,
        /// webhook.created, webhook.updated, webhook.deleted, owner.updated, owner.deleted).
        #[arg(long, value_parser = parse_action)]
        action: Option<AuditAction>,
        /// Only events this recent (24h, 7d) or since this RFC 3339 instant.
        #[arg(long, value_name = "WHEN", value_parser = parse_when)]
        since: Option<When>,
        /// Only events before this (a duration ago, or an RFC 3339 instant).
        #[arg(long, value_name = "WHEN", value_parser = parse_when)]
        until: Option<When>,
        /// Only events numbered after this (the previous page's last number).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        /// At most this many events (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Check the whole log's chain of MACs: exits 0 when it is intact, 1 naming the first
    /// broken event otherwise. Needs every secret that sealed events in the ring
    /// (KEYWARDEN_PREVIOUS_SECRETS).
    Verify,
    /// Delete events older than a retention period, keeping the rest verifiable (a sealed
    /// checkpoint replaces what was deleted).
    Prune {
        /// Keep this much history (e.g. 90d).
        #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
        older_than: time::Duration,
    },
}

/// A point in time: an instant, or a duration before now.
#[derive(Clone, Copy)]
pub(crate) enum When {
    At(OffsetDateTime),
    Ago(time::Duration),
}

impl When {
    pub(crate) fn at(self, now: OffsetDateTime) -> OffsetDateTime {
        match self {
            Self::At(at) => at,
            Self::Ago(span) => now.checked_sub(span).unwrap_or(OffsetDateTime::UNIX_EPOCH),
        }
    }
}

pub(crate) fn parse_when(text: &str) -> Result<When, String> {
    if let Ok(at) = OffsetDateTime::parse(text.trim(), &Rfc3339) {
        return Ok(When::At(at));
    }
    parse_duration(text)
        .map(When::Ago)
        .map_err(|_| "expected a duration such as 24h or 7d, or an RFC 3339 instant".to_owned())
}

fn parse_actor(text: &str) -> Result<String, String> {
    keywarden::audit::check_actor_filter(text).map(|()| text.to_owned())
}

fn parse_retention(text: &str) -> Result<time::Duration, String> {
    parse_duration(text).map_err(|_| "expected a duration such as 90d".to_owned())
}

fn parse_action(text: &str) -> Result<AuditAction, String> {
    text.parse()
        .map_err(|e: keywarden::audit::AuditActionParseError| e.to_string())
}

fn parse_id(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text.trim()).map_err(|e| format!("not a key id (a UUID): {e}"))
}

/// Runs an `audit` command.
pub(crate) async fn audit(
    ctx: &Context,
    command: AuditCommand,
    out: Output,
) -> Result<(), Failure> {
    let manager = cli_manager(ctx).await?;
    match command {
        AuditCommand::List {
            key_id,
            actor,
            action,
            since,
            until,
            after,
            limit,
        } => {
            let now = OffsetDateTime::now_utc();
            let query = AuditQuery {
                key_id,
                actor,
                action,
                since: since.map(|w| w.at(now)),
                until: until.map(|w| w.at(now)),
                after,
                limit,
                ..AuditQuery::default()
            };
            let page = manager.audit(&query).await?;
            if out.json {
                out.print_json(&json!({ "items": page.items, "next_cursor": page.next_cursor }));
                return Ok(());
            }
            if page.items.is_empty() {
                println!("no audit events");
            }
            for event in &page.items {
                println!("{}", event_line(event));
            }
            if let Some(next) = page.next_cursor {
                println!("more: --after {next}");
            }
            Ok(())
        }
        AuditCommand::Verify => {
            let verification = manager.verify_audit().await?;
            let head = |h: ChainHead| json!({ "seq": h.seq, "mac": h.mac.to_hex() });
            if out.json {
                out.print_json(&json!({
                    "intact": verification.broken.is_none(),
                    "checked": verification.checked,
                    "checkpoint": verification.checkpoint.map(head),
                    "head": head(verification.head),
                    "broken_at": verification.broken.map(|(seq, _)| seq),
                    "reason": verification.broken.map(|(_, why)| why.to_string()),
                }));
            }
            match verification.broken {
                None => {
                    if !out.json {
                        let from = verification
                            .checkpoint
                            .map(|c| format!(" after the retention checkpoint at #{}", c.seq))
                            .unwrap_or_default();
                        println!(
                            "audit log intact: {} event(s) checked{from}; head #{} {}",
                            verification.checked,
                            verification.head.seq,
                            verification.head.mac.to_hex()
                        );
                        println!(
                            "(note the head somewhere the database's writers cannot reach: a \
                             later check then also shows events deleted from the end)"
                        );
                    }
                    Ok(())
                }
                Some((0, why)) => Err(Failure(format!(
                    "audit log broken at its retention checkpoint: {why}"
                ))),
                Some((seq, why)) => Err(Failure(format!(
                    "audit log broken at event #{seq}: {why}; {} event(s) before it verified",
                    verification.checked
                ))),
            }
        }
        AuditCommand::Prune { older_than } => {
            let deleted = manager.prune_audit(older_than).await?;
            if out.json {
                out.print_json(&json!({ "deleted": deleted }));
            } else {
                println!("deleted {deleted} audit event(s); the rest stays verifiable");
            }
            Ok(())
        }
    }
}

/// `#12  2026-12-02T10:00:00Z  key.revoked  key 0190… (users/alice)  by key:0190… (root)
/// from 10.0.0.1 request req-1  changed: revoked_at` — the subject of the event first, then
/// who did it.
fn event_line(event: &AuditEvent) -> String {
    let at = event
        .at
        .replace_nanosecond(0)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_default();
    let mut line = format!("#{:<5} {at}  {:<15}", event.seq, event.action.as_str());
    match event.key_id {
        Some(id) => {
            line.push_str(&format!(" key {id}"));
            if let (Some(c), Some(s)) = (&event.collection, &event.subject) {
                line.push_str(&format!(" ({}/{})", escape(c), escape(s)));
            }
        }
        None => {
            if let Some(id) = event.changes.get("webhook_id").and_then(|v| v.as_str()) {
                line.push_str(&format!(" webhook {}", escape(id)));
            } else if let Some(id) = event.changes.get("secret_id").and_then(|v| v.as_str()) {
                line.push_str(&format!(" secret {}", escape(id)));
            } else if let (Some(c), Some(s)) = (&event.collection, &event.subject) {
                line.push_str(&format!(" owner {}/{}", escape(c), escape(s)));
            }
        }
    }
    line.push_str(&format!("  by {}", escape(&event.actor.to_string())));
    if let Some(subject) = event.actor.subject() {
        line.push_str(&format!(" ({})", escape(subject)));
    }
    if let Some(address) = event.client_address {
        line.push_str(&format!(" from {address}"));
    }
    if let Some(id) = &event.request_id {
        line.push_str(&format!(" request {id}"));
    }
    let fields: Vec<&str> = event
        .changes
        .keys()
        .map(String::as_str)
        .filter(|k| {
            ![
                "webhook_id",
                "secret_id",
                "successor",
                "rotated_from",
                "collection",
                "subject",
            ]
            .contains(k)
        })
        .collect();
    if !fields.is_empty() {
        line.push_str(&format!("  changed: {}", escape(&fields.join(", "))));
    }
    line
}

/// Control characters escaped: one event is one line.
fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect()
}
