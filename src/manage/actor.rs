//! Who performs a management operation.

use std::fmt;

use uuid::Uuid;

use crate::principal::Principal;

/// Who performs a management operation: the caller recorded with every
/// [`reveal`](crate::KeyManager::reveal), and the budget its reveals are rate limited under.
///
/// Meant to be the one caller identity of every audited operation: the persisted audit log
/// records these same values.
///
/// ```
/// use keywarden::manage::Actor;
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
    /// Any other caller, named by the application (an admin UI user, a job).
    Other(String),
}

impl Actor {
    /// The caller behind a verified key.
    pub fn key(principal: &Principal) -> Self {
        Self::Key {
            id: principal.key_id(),
            subject: principal.subject().to_owned(),
        }
    }

    /// `cli`, `key` or `other`: a stable label for logs and filters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Key { .. } => "key",
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
}

impl From<&Principal> for Actor {
    fn from(principal: &Principal) -> Self {
        Self::key(principal)
    }
}

/// `cli`, `key:<id>` or `other:<name>`, with control characters in the name escaped so one
/// actor is always one log line.
impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cli => f.write_str("cli"),
            Self::Key { id, .. } => write!(f, "key:{id}"),
            Self::Other(name) => {
                f.write_str("other:")?;
                name.chars().try_for_each(|c| match c.is_control() {
                    true => write!(f, "{}", c.escape_default()),
                    false => write!(f, "{c}"),
                })
            }
        }
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
    }
}
