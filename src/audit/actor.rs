//! Who performs a management operation.

use std::fmt;

use serde::Serialize;
use uuid::Uuid;

/// Who performs a management operation: recorded with every [audit event](super::AuditEvent)
/// and every [`reveal`](crate::KeyManager::reveal), and the budget reveals are rate limited
/// under.
///
/// ```
/// use keywarden::audit::Actor;
///
/// let admin = Actor::Other("admin-ui:alice@example.com".into());
/// assert_eq!(admin.kind(), "other");
/// assert_eq!(Actor::Cli.to_string(), "cli");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Actor {
    /// The `keywarden` command-line tool, run by whoever holds the database and secrets.
    Cli,
    /// A caller authenticated by an API key (the management API).
    Key {
        /// The caller's key id.
        id: Uuid,
        /// The caller's subject (owner id).
        subject: String,
    },
    /// A change made without keywarden: plain SQL on PostgreSQL, recorded by a trigger, with
    /// the database role that made it.
    Sql(String),
    /// Any other caller, named by the application (an admin UI user, a job).
    Other(String),
}

impl Actor {
    /// `Other("application")`: the actor of a [`KeyManager`](crate::KeyManager) the
    /// application calls directly without naming one.
    pub fn application() -> Self {
        Self::Other("application".to_owned())
    }

    /// An actor shown by kind only (to callers who may not see who): `cli` stays `Cli`; the
    /// others keep their kind with the name `redacted` (a key with the nil id).
    pub fn redacted(kind: &str) -> Self {
        match kind {
            "cli" => Self::Cli,
            "key" => Self::Key {
                id: Uuid::nil(),
                subject: "redacted".into(),
            },
            "sql" => Self::Sql("redacted".into()),
            _ => Self::Other("redacted".into()),
        }
    }

    /// `cli`, `key`, `sql` or `other`: a stable label for logs and filters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Key { .. } => "key",
            Self::Sql(_) => "sql",
            Self::Other(_) => "other",
        }
    }

    /// The caller's key id, for [`Actor::Key`].
    pub fn key_id(&self) -> Option<Uuid> {
        match self {
            Self::Key { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// The caller's subject, for [`Actor::Key`].
    pub fn subject(&self) -> Option<&str> {
        match self {
            Self::Key { subject, .. } => Some(subject),
            _ => None,
        }
    }

    /// The subject of [`Actor::Key`] or the name of [`Actor::Other`].
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Key { subject, .. } => Some(subject),
            Self::Other(name) | Self::Sql(name) => Some(name),
            _ => None,
        }
    }

    /// The actor stored as [`kind`](Self::kind), [`key_id`](Self::key_id) and
    /// [`name`](Self::name); `None` for a combination no actor has.
    pub fn from_parts(kind: &str, key_id: Option<Uuid>, name: Option<String>) -> Option<Self> {
        match (kind, key_id, name) {
            ("cli", None, None) => Some(Self::Cli),
            ("sql", None, Some(role)) => Some(Self::Sql(role)),
            ("key", Some(id), Some(subject)) => Some(Self::Key { id, subject }),
            ("other", None, Some(name)) => Some(Self::Other(name)),
            _ => None,
        }
    }
}

/// `cli`, `key:<id>`, `sql:<role>` or `other:<name>`, with control characters in names
/// escaped so one actor is always one log line.
impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cli => f.write_str("cli"),
            Self::Key { id, .. } => write!(f, "key:{id}"),
            Self::Other(name) | Self::Sql(name) => {
                write!(f, "{}:", self.kind())?;
                name.chars().try_for_each(|c| match c.is_control() {
                    true => write!(f, "{}", c.escape_default()),
                    false => write!(f, "{c}"),
                })
            }
        }
    }
}

/// `{"kind": "key", "id": …, "subject": …}`, `{"kind": "other", "name": …}`, or
/// `{"kind": "sql", "name": <role>}`, `{"kind": "cli"}`.
impl Serialize for Actor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("kind", self.kind())?;
        match self {
            Self::Key { id, subject } => {
                map.serialize_entry("id", id)?;
                map.serialize_entry("subject", subject)?;
            }
            Self::Other(name) | Self::Sql(name) => map.serialize_entry("name", name)?,
            Self::Cli => {}
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_and_kind_is_stable() {
        let id = Uuid::now_v7();
        let key = Actor::Key {
            id,
            subject: "alice".into(),
        };
        assert_eq!(key.to_string(), format!("key:{id}"));
        assert_eq!(
            (key.kind(), key.key_id(), key.subject()),
            ("key", Some(id), Some("alice"))
        );
        let sneaky = Actor::Other("bob\nkey revealed actor=cli\u{1b}[0m".into());
        let shown = sneaky.to_string();
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert!(shown.starts_with("other:bob\\n"), "{shown}");
        assert_eq!((Actor::Cli.kind(), Actor::Cli.key_id()), ("cli", None));
        assert_eq!(Actor::Sql("dba".into()).to_string(), "sql:dba");
    }

    #[test]
    fn parts_round_trip() {
        for actor in [
            Actor::Cli,
            Actor::Sql("postgres".into()),
            Actor::application(),
            Actor::Key {
                id: Uuid::now_v7(),
                subject: "alice".into(),
            },
        ] {
            let back =
                Actor::from_parts(actor.kind(), actor.key_id(), actor.name().map(Into::into));
            assert_eq!(back, Some(actor));
        }
        assert_eq!(Actor::from_parts("key", None, Some("x".into())), None);
        assert_eq!(Actor::from_parts("cli", None, Some("x".into())), None);
        assert_eq!(
            serde_json::to_value(Actor::Cli).unwrap(),
            serde_json::json!({"kind": "cli"})
        );
    }
}
