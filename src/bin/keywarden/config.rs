//! `--config keywarden.toml`: every `serve` setting (and the database, key prefixes and Redis
//! of the other commands) in one file. A command-line flag wins over its environment variable,
//! which wins over the file, which wins over the default. Secrets are never read from the
//! file: they come from the environment (`KEYWARDEN_SECRET` or `KEYWARDEN_SECRET_FILE`).
//!
//! A file that does not parse, holds an unknown field or a bad value stops the command before
//! it starts, naming the line and the field (`keywarden.toml line 7, cache.ttl: ...`), and
//! never repeating a URL's value. `docs/deploy.md` lists every field.

use std::path::Path;
use std::time::Duration as StdDuration;

use http::HeaderName;
use keywarden::key::KeyFormat;
use keywarden::net::{IpNetwork, IpNetworkParseError};
use keywarden::{manage::parse_duration, ratelimit::RateLimitPolicy};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::Failure;

/// The file, as written: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`.
    pub(crate) database_url: Option<String>,
    /// The key prefixes this deployment issues and accepts (`kw_live`, `kw_test`).
    pub(crate) key_prefixes: Option<ConfigKeyFormat>,
    #[serde(default)]
    pub(crate) server: ServerSection,
    #[serde(default)]
    pub(crate) auth: AuthSection,
    #[serde(default)]
    pub(crate) cache: CacheSection,
    #[serde(default)]
    pub(crate) redis: RedisSection,
    #[serde(default)]
    pub(crate) log: LogSection,
}

/// `[server]`: where and how `serve` listens.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerSection {
    pub(crate) addr: Option<String>,
    pub(crate) metrics_addr: Option<String>,
    pub(crate) shutdown_delay: Option<ConfigDuration>,
    pub(crate) shutdown_grace: Option<ConfigDuration>,
    pub(crate) audit_retention: Option<ConfigDuration>,
    pub(crate) usage_retention: Option<ConfigDuration>,
    pub(crate) webhook_hosts: Option<Vec<String>>,
    pub(crate) webhook_allow_http: Option<bool>,
    pub(crate) webhook_allow_private: Option<bool>,
    pub(crate) webhook_expiring_lead: Option<ConfigDuration>,
    pub(crate) client_address_header: Option<ConfigHeader>,
    pub(crate) trusted_proxies: Option<Vec<ConfigNetwork>>,
    pub(crate) verify_without_key_on_loopback: Option<bool>,
    pub(crate) revocation_poll: Option<ConfigDuration>,
    pub(crate) revocation_listen: Option<bool>,
    pub(crate) max_blind: Option<ConfigDuration>,
    pub(crate) prefer_availability: Option<bool>,
}

/// `[auth]`: what the layer accepts and how it limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthSection {
    pub(crate) collections: Option<Vec<String>>,
    pub(crate) opaque_collections: Option<Vec<String>>,
    pub(crate) headers: Option<Vec<ConfigHeader>>,
    pub(crate) default_rate_limit: Option<ConfigRate>,
    /// Collection slug → the budget each owner's keys share there.
    pub(crate) owner_rate_limits: Option<std::collections::BTreeMap<String, ConfigRate>>,
    pub(crate) max_failed_attempts: Option<u32>,
    pub(crate) failed_attempt_window: Option<ConfigDuration>,
}

/// `[cache]`: the layer's cache and store timings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheSection {
    pub(crate) ttl: Option<ConfigDuration>,
    pub(crate) negative_ttl: Option<ConfigDuration>,
    pub(crate) capacity: Option<u64>,
    pub(crate) stale_window: Option<ConfigDuration>,
    pub(crate) store_timeout: Option<ConfigDuration>,
    pub(crate) usage_flush_interval: Option<ConfigDuration>,
    /// The most credits one lease takes from the store.
    pub(crate) credit_lease_block: Option<u64>,
    /// How long a lease sits unused before it goes back.
    pub(crate) credit_lease_idle: Option<ConfigDuration>,
}

/// `[redis]`: shared rate limits and invalidation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisSection {
    pub(crate) url: Option<String>,
    pub(crate) namespace: Option<String>,
}

/// `[log]`: what `serve` logs, and how.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSection {
    pub(crate) format: Option<LogFormat>,
    pub(crate) level: Option<String>,
    pub(crate) requests: Option<bool>,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// A duration written `250ms`, `90s`, `15m`, `24h`, `30d` or `2w` (or `0s` where zero means off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConfigDuration(pub(crate) StdDuration);

impl std::str::FromStr for ConfigDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Some(millis) = text.strip_suffix("ms") {
            return match millis.parse::<u64>() {
                Ok(n) if millis.bytes().all(|b| b.is_ascii_digit()) => {
                    Ok(Self(StdDuration::from_millis(n)))
                }
                _ => Err(format!(
                    "invalid duration {text:?}: expected e.g. 250ms, 90s, 15m, 24h"
                )),
            };
        }
        if !text.is_empty() && text.trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
            return match &text[1..] {
                "" | "s" | "m" | "min" | "h" | "d" | "w" => Ok(Self(StdDuration::ZERO)),
                _ => Err(format!("invalid duration {text:?}: unknown unit")),
            };
        }
        let duration = parse_duration(text).map_err(|_| {
            format!(
                "invalid duration {:?}: expected a number with a unit ms, s, m, h, d or w \
                 (e.g. 250ms, 90s, 15m, 24h)",
                text.chars().take(32).collect::<String>()
            )
        })?;
        let seconds = u64::try_from(duration.whole_seconds()).map_err(|_| "negative duration")?;
        Ok(Self(StdDuration::from_secs(seconds)))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A header name (`X-Real-IP`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigHeader(pub(crate) HeaderName);

impl std::str::FromStr for ConfigHeader {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.trim().parse::<HeaderName>().map(Self).map_err(|_| {
            "not a valid HTTP header name (letters, digits and `-`, e.g. X-Real-IP)".to_owned()
        })
    }
}

impl<'de> Deserialize<'de> for ConfigHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// An IP network (`10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConfigNetwork(pub(crate) IpNetwork);

impl std::str::FromStr for ConfigNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse()
            .map(Self)
            .map_err(|e: IpNetworkParseError| e.to_string())
    }
}

impl<'de> Deserialize<'de> for ConfigNetwork {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// The key prefixes, checked as a [`KeyFormat`].
#[derive(Debug, Clone)]
pub(crate) struct ConfigKeyFormat(pub(crate) KeyFormat);

impl<'de> Deserialize<'de> for ConfigKeyFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let prefixes = Vec::<String>::deserialize(deserializer)?;
        if prefixes.is_empty() {
            return Err(de::Error::custom("at least one prefix is needed"));
        }
        KeyFormat::new(prefixes.iter().map(String::as_str))
            .map(Self)
            .map_err(de::Error::custom)
    }
}

/// A rate limit (`100/min`, `10/s,burst=20`).
#[derive(Debug, Clone)]
pub(crate) struct ConfigRate(pub(crate) RateLimitPolicy);

impl<'de> Deserialize<'de> for ConfigRate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse::<RateLimitPolicy>()
            .map(Self)
            .map_err(de::Error::custom)
    }
}

/// The most a config file may hold: it is a few dozen lines, never megabytes.
const MAX_FILE_BYTES: u64 = 1 << 20;

impl FileConfig {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// A [`Failure`] naming the file, and for a bad field its line and name.
    pub(crate) fn load(path: &Path) -> Result<Self, Failure> {
        let name = path.display();
        let metadata = std::fs::metadata(path)
            .map_err(|e| Failure(format!("cannot read the config file {name}: {e}")))?;
        if metadata.len() > MAX_FILE_BYTES {
            return Err(Failure(format!(
                "the config file {name} is larger than {MAX_FILE_BYTES} bytes"
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure(format!("cannot read the config file {name}: {e}")))?;
        Self::parse(&text).map_err(|e| Failure(format!("{name} {e}")))
    }

    /// Parses the text of a config file; the error starts with `line N, field: `.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|error| describe(text, &error))
    }
}

/// `line N, section.field: message` for a TOML or field error, from its span. The message is
/// the parser's or the field's own, never the source line (which may hold a database URL with
/// a password).
fn describe(text: &str, error: &toml::de::Error) -> String {
    let mut message = without_strings(error.message().trim().trim_end_matches('.'));
    if message.starts_with("unknown field `secret") || message.starts_with("unknown field `key`") {
        message
            .push_str("; secrets are never read from the config file: set KEYWARDEN_SECRET_FILE");
    }
    let message = message.as_str();
    let Some(span) = error.span() else {
        return format!("is invalid: {message}");
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_number = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_number - 1).unwrap_or("");
    // Only a plain key is named: a mangled line (`database_url "postgres://u:pw@..."`) is
    // not repeated.
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim().trim_matches('"'))
        .filter(|key| {
            !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        });
    // The table the line belongs to: the last `[section]` header above it.
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (section, key) {
        (Some(section), Some(key)) => format!("line {line_number}, {section}.{key}: {message}"),
        (None, Some(key)) => format!("line {line_number}, {key}: {message}"),
        (_, None) => format!("line {line_number}: {message}"),
    }
}

/// serde's messages quote a mistyped value (`invalid type: string "postgres://u:pw@db",
/// expected a sequence`): the value becomes `a string`.
fn without_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let quoted = &rest[at + "string \"".len()..];
        // The closing quote: the first one not escaped.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        match end {
            Some(end) => rest = &quoted[end + 1..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_all_defaults() {
        let config = FileConfig::parse("").unwrap();
        assert!(config.database_url.is_none());
        assert!(config.server.addr.is_none());
        assert!(config.cache.ttl.is_none());
    }

    #[test]
    fn every_section_parses() {
        let config = FileConfig::parse(
            r#"
database_url = "postgres://kw@db/keys"
key_prefixes = ["acme_live", "acme_test"]

[server]
addr = "0.0.0.0:3000"
metrics_addr = "127.0.0.1:9464"
shutdown_delay = "5s"
shutdown_grace = "20s"
client_address_header = "X-Real-IP"
trusted_proxies = ["10.0.0.0/8", "::1"]
verify_without_key_on_loopback = false

[auth]
collections = ["users", "services"]
opaque_collections = ["imported"]
headers = ["X-Stack-Api-Key"]
default_rate_limit = "100/min"
owner_rate_limits = { users = "500/min" }
max_failed_attempts = 20
failed_attempt_window = "1m"

[cache]
ttl = "30s"
negative_ttl = "2s"
capacity = 5000
stale_window = "0s"
store_timeout = "500ms"
usage_flush_interval = "5s"
credit_lease_block = 20
credit_lease_idle = "2s"

[redis]
url = "redis://127.0.0.1:6379"
namespace = "acme"

[log]
format = "json"
level = "keywarden=debug,info"
requests = true
"#,
        )
        .unwrap();
        assert_eq!(
            config.database_url.as_deref(),
            Some("postgres://kw@db/keys")
        );
        assert_eq!(
            config.server.shutdown_grace,
            Some(ConfigDuration(StdDuration::from_secs(20)))
        );
        assert_eq!(
            config.server.client_address_header.unwrap().0.as_str(),
            "x-real-ip"
        );
        assert_eq!(
            config.server.trusted_proxies.unwrap(),
            [
                ConfigNetwork("10.0.0.0/8".parse().unwrap()),
                ConfigNetwork("::1".parse().unwrap())
            ]
        );
        assert_eq!(config.auth.collections.unwrap(), ["users", "services"]);
        assert_eq!(config.auth.max_failed_attempts, Some(20));
        let owners = config.auth.owner_rate_limits.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners["users"].0.to_string(), "500/min");
        assert_eq!(
            config.cache.store_timeout,
            Some(ConfigDuration(StdDuration::from_millis(500)))
        );
        assert_eq!(
            config.cache.stale_window,
            Some(ConfigDuration(StdDuration::ZERO))
        );
        assert_eq!(config.cache.capacity, Some(5000));
        assert_eq!(config.cache.credit_lease_block, Some(20));
        assert_eq!(
            config.cache.credit_lease_idle,
            Some(ConfigDuration(StdDuration::from_secs(2)))
        );
        assert_eq!(config.redis.namespace.as_deref(), Some("acme"));
        assert_eq!(config.log.format, Some(LogFormat::Json));
        assert_eq!(config.log.requests, Some(true));
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let error =
            FileConfig::parse("[server]\naddr = \"x\"\n\n[cache]\nttl = \"soon\"\n").unwrap_err();
        assert!(
            error.starts_with("line 5, cache.ttl: invalid duration"),
            "{error}"
        );

        let error = FileConfig::parse("[cache]\nttl_seconds = 5\n").unwrap_err();
        assert!(
            error.starts_with("line 2, cache.ttl_seconds: unknown field"),
            "{error}"
        );

        let error = FileConfig::parse("[server]\naddr = 3000\n").unwrap_err();
        assert!(
            error.starts_with("line 2, server.addr: invalid type"),
            "{error}"
        );

        let error = FileConfig::parse("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(
            error.starts_with("line 2, log.format: unknown variant"),
            "{error}"
        );

        let error = FileConfig::parse("[auth]\ndefault_rate_limit = \"lots\"\n").unwrap_err();
        assert!(
            error.starts_with("line 2, auth.default_rate_limit:"),
            "{error}"
        );

        let error =
            FileConfig::parse("[server]\nclient_address_header = \"not a header\"\n").unwrap_err();
        assert!(
            error.starts_with("line 2, server.client_address_header: not a valid HTTP header"),
            "{error}"
        );

        let error =
            FileConfig::parse("[server]\ntrusted_proxies = [\"10.0.0.1/8\"]\n").unwrap_err();
        assert!(
            error.starts_with("line 2, server.trusted_proxies: invalid IP network"),
            "{error}"
        );

        let error = FileConfig::parse("secret = \"hunter2hunter2hunter2\"\n").unwrap_err();
        assert!(
            error.starts_with("line 1, secret: unknown field"),
            "{error}"
        );
        assert!(!error.contains("hunter2"), "{error}");

        let error = FileConfig::parse("[cache\nttl = \"1s\"\n").unwrap_err();
        assert!(error.starts_with("line 1"), "{error}");
    }

    #[test]
    fn errors_never_repeat_a_mistyped_value_or_a_mangled_line() {
        for text in [
            "database_url \"postgres://kw:hunter2@db/keys?sslmode=require\"\n",
            "postgres://kw:hunter2@db/keys?sslmode=require\n",
            "key_prefixes = \"postgres://kw:hunter2@db/keys\"\n",
            "[server]\nverify_without_key_on_loopback = \"redis://:hunter2@r\"\n",
            "[redis]\nurl = [\"redis://:hunter2@r\"]\n",
            "[log]\nlevel = { a = \"hunter2\" }\n",
        ] {
            let error = FileConfig::parse(text).unwrap_err();
            assert!(error.starts_with("line "), "{error}");
            assert!(!error.contains("hunter2"), "{text}: {error}");
        }
        let error = FileConfig::parse("key_prefixes = \"kw_live\"\n").unwrap_err();
        assert!(
            error.starts_with("line 1, key_prefixes: invalid type: a string, expected"),
            "{error}"
        );
        let error = FileConfig::parse("key_prefixes = [\"Bad Prefix\"]\n").unwrap_err();
        assert!(
            error.starts_with("line 1, key_prefixes: invalid key prefix"),
            "{error}"
        );
        let error = FileConfig::parse("key_prefixes = []\n").unwrap_err();
        assert!(
            error.starts_with("line 1, key_prefixes: at least one"),
            "{error}"
        );
        let error = FileConfig::parse("secret_file = \"/run/x\"\n").unwrap_err();
        assert!(error.contains("set KEYWARDEN_SECRET_FILE"), "{error}");
    }

    #[test]
    fn quoted_values_leave_messages() {
        assert_eq!(
            without_strings(r#"invalid type: string "a\"b", expected u64"#),
            "invalid type: a string, expected u64"
        );
        assert_eq!(without_strings("no strings"), "no strings");
        assert_eq!(without_strings(r#"string "unterminated"#), "a string");
    }

    #[test]
    fn errors_never_repeat_a_url() {
        // A syntax error on the line of a URL with a password: the message is the parser's.
        let error = FileConfig::parse("database_url = \"postgres://kw:hunter2@db/keys\nx = 1\n")
            .unwrap_err();
        assert!(error.starts_with("line 1"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn the_documented_example_parses() {
        let config = FileConfig::parse(include_str!("../../../docs/deploy/keywarden.toml"))
            .unwrap_or_else(|e| panic!("docs/deploy/keywarden.toml: {e}"));
        assert_eq!(config.auth.max_failed_attempts, Some(20));
        assert_eq!(config.log.format, Some(LogFormat::Json));
    }

    #[test]
    fn durations() {
        let parse = |s: &str| s.parse::<ConfigDuration>().map(|d| d.0);
        assert_eq!(parse("250ms"), Ok(StdDuration::from_millis(250)));
        assert_eq!(parse("90s"), Ok(StdDuration::from_secs(90)));
        assert_eq!(parse("15m"), Ok(StdDuration::from_secs(900)));
        assert_eq!(parse("2h"), Ok(StdDuration::from_secs(7200)));
        assert_eq!(parse("0"), Ok(StdDuration::ZERO));
        assert_eq!(parse("0s"), Ok(StdDuration::ZERO));
        assert!(parse("-5s").is_err());
        assert!(parse("5").is_err());
        assert!(parse("1.5s").is_err());
        assert!(parse("ms").is_err());
        assert!(parse("0x").is_err());
    }
}
