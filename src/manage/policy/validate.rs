//! What a key's fields may hold: one rule for every front end.

use super::super::{ExpiresIn, ManageError, NewKey};
use crate::net::IpNetwork;
use crate::store::{KeyPatch, OwnerPolicyUpdate, MAX_CREDITS};

/// Longest accepted name, description, subject and metadata, in bytes.
const MAX_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 2_000;
const MAX_SUBJECT: usize = 256;
const MAX_SLUG: usize = 64;
const MAX_SCOPE: usize = 128;
const MAX_SCOPES: usize = 100;
const MAX_METADATA: usize = 16 * 1024;
/// Most networks in one key's allowlist: checked on every request with the key.
pub(crate) const MAX_ALLOWED_IPS: usize = 64;

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), ManageError> {
    if value.trim().is_empty() {
        return Err(ManageError::invalid(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if value.len() > max {
        return Err(ManageError::invalid(
            field,
            format!("{field} is longer than {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ManageError::invalid(
            field,
            format!("{field} contains control characters"),
        ));
    }
    Ok(())
}

fn check_token(field: &'static str, value: &str, max: usize) -> Result<(), ManageError> {
    if value.is_empty() || value.len() > max || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ManageError::invalid(
            field,
            format!("{field} must be 1 to {max} visible ASCII characters"),
        ));
    }
    Ok(())
}

pub(crate) fn check_scopes(scopes: &mut Vec<String>) -> Result<(), ManageError> {
    if scopes.len() > MAX_SCOPES {
        return Err(ManageError::invalid(
            "scopes",
            format!("at most {MAX_SCOPES} scopes"),
        ));
    }
    for scope in scopes.iter() {
        check_token("scopes", scope, MAX_SCOPE)?;
    }
    scopes.sort();
    scopes.dedup();
    Ok(())
}

/// An allowlist: at most [`MAX_ALLOWED_IPS`] networks, sorted, without repeats.
pub(crate) fn check_allowed_ips(networks: &mut Vec<IpNetwork>) -> Result<(), ManageError> {
    networks.sort();
    networks.dedup();
    if networks.len() > MAX_ALLOWED_IPS {
        return Err(ManageError::invalid(
            "allowed_ips",
            format!(
                "allowed_ips holds {} networks; at most {MAX_ALLOWED_IPS} are allowed",
                networks.len()
            ),
        ));
    }
    Ok(())
}

/// A credit balance: at most [`MAX_CREDITS`].
pub(crate) fn check_credits(credits: u64) -> Result<(), ManageError> {
    if credits > MAX_CREDITS {
        return Err(ManageError::invalid(
            "credits",
            format!("credits must be from 0 to {MAX_CREDITS}"),
        ));
    }
    Ok(())
}

/// Free text holds no control characters: NUL cannot be stored (PostgreSQL refuses it in TEXT
/// and JSONB), and the others corrupt terminals and logs. One rule for the library, the CLI and
/// the HTTP API.
fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// [`has_control`] at every depth of a JSON value, member names included. serde_json caps
/// parsed nesting at 128 levels, which bounds the recursion for submitted values.
fn json_has_control(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(text) => has_control(text),
        Value::Array(items) => items.iter().any(json_has_control),
        Value::Object(members) => members
            .iter()
            .any(|(k, v)| has_control(k) || json_has_control(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fn control_characters(field: &'static str) -> ManageError {
    ManageError::invalid(
        field,
        format!("{field} must not contain control characters"),
    )
}

fn check_description(description: &str) -> Result<(), ManageError> {
    if description.len() > MAX_DESCRIPTION {
        return Err(ManageError::invalid(
            "description",
            format!("description is longer than {MAX_DESCRIPTION} bytes"),
        ));
    }
    if has_control(description) {
        return Err(control_characters("description"));
    }
    Ok(())
}

fn check_metadata(metadata: &mut serde_json::Value) -> Result<(), ManageError> {
    if metadata.is_null() {
        *metadata = serde_json::Value::Object(Default::default());
    }
    if !metadata.is_object() {
        return Err(ManageError::invalid(
            "metadata",
            "metadata must be a JSON object",
        ));
    }
    if metadata.to_string().len() > MAX_METADATA {
        return Err(ManageError::invalid(
            "metadata",
            format!("metadata is larger than {MAX_METADATA} bytes"),
        ));
    }
    if json_has_control(metadata) {
        return Err(control_characters("metadata"));
    }
    Ok(())
}

pub(crate) fn validate_new(mut new: NewKey) -> Result<NewKey, ManageError> {
    check_text("name", &new.name, MAX_NAME)?;
    if let Some(description) = &new.description {
        check_description(description)?;
    }
    if let Some(collection) = &new.collection {
        check_token("collection", collection, MAX_SLUG)?;
    }
    check_text("subject", &new.subject, MAX_SUBJECT)?;
    check_scopes(&mut new.scopes)?;
    check_metadata(&mut new.metadata)?;
    check_allowed_ips(&mut new.allowed_ips)?;
    if let Some(credits) = &new.credits {
        check_credits(credits.remaining)?;
    }
    if let ExpiresIn::After(d) = new.expires_in {
        if !d.is_positive() {
            return Err(ManageError::invalid(
                "expires_in",
                "the lifetime must be positive",
            ));
        }
    }
    Ok(new)
}

pub(crate) fn validate_patch(patch: &mut KeyPatch) -> Result<(), ManageError> {
    if let Some(name) = &patch.name {
        check_text("name", name, MAX_NAME)?;
    }
    if let Some(Some(description)) = &patch.description {
        check_description(description)?;
    }
    if let Some(scopes) = &patch.scopes {
        check_scopes(&mut scopes.clone())?;
    }
    if let Some(metadata) = &patch.metadata {
        check_metadata(&mut metadata.clone())?;
    }
    if let Some(networks) = &mut patch.allowed_ips {
        check_allowed_ips(networks)?;
    }
    if let Some(Some(credits)) = patch.credits {
        check_credits(credits)?;
    }
    if matches!(patch.credits, Some(None)) && matches!(patch.credit_refill, Some(Some(_))) {
        return Err(ManageError::invalid(
            "refill",
            "a key without credits has no refill: set credits too",
        ));
    }
    Ok(())
}

/// An owner policy change: the owner named well, a balance in range, no refill without
/// credits, and something to change.
pub(crate) fn validate_owner(
    collection: &str,
    subject: &str,
    update: &OwnerPolicyUpdate,
) -> Result<(), ManageError> {
    check_token("collection", collection, MAX_SLUG)?;
    check_text("subject", subject, MAX_SUBJECT)?;
    if let Some(Some(credits)) = update.credits {
        check_credits(credits)?;
    }
    if matches!(update.credits, Some(None)) && matches!(update.refill, Some(Some(_))) {
        return Err(ManageError::invalid(
            "refill",
            "an owner without credits has no refill: set credits too",
        ));
    }
    if *update == OwnerPolicyUpdate::default() {
        return Err(ManageError::invalid(
            "rate_limit",
            "nothing to change: set rate_limit, credits or refill",
        ));
    }
    Ok(())
}

/// [`validate_new`]'s and [`validate_patch`]'s control-character rule for the free text of a
/// request, checked before the policy's other questions so a front end answers it first.
#[cfg(feature = "manage-api")]
pub(crate) fn check_free_text(
    description: Option<&str>,
    metadata: Option<&serde_json::Value>,
) -> Result<(), ManageError> {
    if description.is_some_and(has_control) {
        Err(control_characters("description"))
    } else if metadata.is_some_and(json_has_control) {
        Err(control_characters("metadata"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowlist_holds_up_to_64_networks_after_removing_repeats() {
        let networks = |n: u8| -> Vec<IpNetwork> {
            (0..n)
                .map(|i| IpNetwork::new(std::net::IpAddr::from([10, 0, i, 0]), 24).unwrap())
                .collect()
        };
        let mut full = networks(64);
        full.extend(networks(64));
        check_allowed_ips(&mut full).unwrap();
        assert_eq!(full.len(), 64, "repeats removed, 64 kept");
        let error = check_allowed_ips(&mut networks(65)).unwrap_err();
        assert_eq!(error.field(), Some("allowed_ips"));
        assert!(
            error.to_string().contains("holds 65 networks; at most 64"),
            "{error}"
        );
    }

    /// One rule for every front end: the library refuses what the HTTP API refuses, with the
    /// same message.
    #[test]
    fn control_characters_are_refused_in_every_free_text_field() {
        for text in [
            "a\0b",
            "\u{1b}[31mred",
            "tab\there",
            "line\nbreak",
            "\u{7f}",
            "\u{85}",
        ] {
            let err = validate_new(NewKey::new("k", "u").description(text)).unwrap_err();
            assert_eq!(err.field(), Some("description"), "{text:?}");
            assert_eq!(
                err.to_string(),
                "description must not contain control characters"
            );
            let err = validate_new(
                NewKey::new("k", "u").metadata(serde_json::json!({"a": [{"b": text}]})),
            )
            .unwrap_err();
            assert_eq!(err.field(), Some("metadata"), "{text:?}");
            assert_eq!(
                err.to_string(),
                "metadata must not contain control characters"
            );
            let err = validate_new(NewKey::new("k", "u").metadata(serde_json::json!({ text: 1 })))
                .unwrap_err();
            assert_eq!(err.field(), Some("metadata"), "{text:?}");
            for field in ["name", "subject"] {
                let new = match field {
                    "name" => NewKey::new(text, "u"),
                    _ => NewKey::new("k", text),
                };
                assert_eq!(validate_new(new).unwrap_err().field(), Some(field));
            }
            let patch = KeyPatch {
                description: Some(Some(text.to_owned())),
                ..KeyPatch::default()
            };
            assert_eq!(
                validate_patch(&mut patch.clone()).unwrap_err().field(),
                Some("description")
            );
        }
        let clean = NewKey::new("naïve ✓", "u")
            .description("café ✓")
            .metadata(serde_json::json!({"ünïcode": ["fine", {"nested": "too"}]}));
        assert!(validate_new(clean).is_ok());
    }

    fn field_of(new: NewKey) -> Option<&'static str> {
        validate_new(new).err().map(|e| e.field().expect("a field"))
    }

    /// Every length limit, at the limit (accepted) and one byte over it (refused).
    #[test]
    fn every_limit_holds_at_its_bound() {
        let ok = |new: NewKey| assert_eq!(field_of(new), None);
        ok(NewKey::new("n".repeat(MAX_NAME), "u"));
        assert_eq!(
            field_of(NewKey::new("n".repeat(MAX_NAME + 1), "u")),
            Some("name")
        );
        ok(NewKey::new("k", "u".repeat(MAX_SUBJECT)));
        assert_eq!(
            field_of(NewKey::new("k", "u".repeat(MAX_SUBJECT + 1))),
            Some("subject")
        );
        ok(NewKey::new("k", "u").description("d".repeat(MAX_DESCRIPTION)));
        assert_eq!(
            field_of(NewKey::new("k", "u").description("d".repeat(MAX_DESCRIPTION + 1))),
            Some("description")
        );
        ok(NewKey::new("k", "u").collection("c".repeat(MAX_SLUG)));
        assert_eq!(
            field_of(NewKey::new("k", "u").collection("c".repeat(MAX_SLUG + 1))),
            Some("collection")
        );
        ok(NewKey::new("k", "u").scope("s".repeat(MAX_SCOPE)));
        assert_eq!(
            field_of(NewKey::new("k", "u").scope("s".repeat(MAX_SCOPE + 1))),
            Some("scopes")
        );
        let scopes =
            |n: usize| (0..n).fold(NewKey::new("k", "u"), |new, i| new.scope(format!("s{i}")));
        ok(scopes(MAX_SCOPES));
        assert_eq!(field_of(scopes(MAX_SCOPES + 1)), Some("scopes"));
        // `{"a":"…"}`: eight bytes around the text.
        let metadata =
            |n: usize| NewKey::new("k", "u").metadata(serde_json::json!({ "a": "m".repeat(n) }));
        ok(metadata(MAX_METADATA - 8));
        assert_eq!(field_of(metadata(MAX_METADATA - 7)), Some("metadata"));
        assert_eq!(MAX_METADATA, 16_384);
    }

    #[test]
    fn names_subjects_and_tokens_must_say_something() {
        for blank in ["", "   ", "\u{3000}"] {
            assert_eq!(field_of(NewKey::new(blank, "u")), Some("name"), "{blank:?}");
            assert_eq!(
                field_of(NewKey::new("k", blank)),
                Some("subject"),
                "{blank:?}"
            );
        }
        for bad in ["", "two words", "tab\t", "naïve", "\u{7f}"] {
            assert_eq!(
                field_of(NewKey::new("k", "u").collection(bad)),
                Some("collection"),
                "{bad:?}"
            );
            assert_eq!(
                field_of(NewKey::new("k", "u").scope(bad)),
                Some("scopes"),
                "{bad:?}"
            );
        }
        assert_eq!(
            field_of(NewKey::new("k", "u").collection("a").scope("b:*")),
            None
        );
    }

    #[test]
    fn metadata_is_an_object_and_null_means_empty() {
        let new = validate_new(NewKey::new("k", "u").metadata(serde_json::Value::Null)).unwrap();
        assert_eq!(new.metadata, serde_json::json!({}));
        for other in [
            serde_json::json!([1]),
            serde_json::json!("text"),
            serde_json::json!(1),
        ] {
            assert_eq!(
                field_of(NewKey::new("k", "u").metadata(other.clone())),
                Some("metadata"),
                "{other}"
            );
        }
    }

    #[test]
    fn a_lifetime_must_be_positive() {
        let after = |d| NewKey::new("k", "u").expires_in(ExpiresIn::After(d));
        assert_eq!(field_of(after(time::Duration::ZERO)), Some("expires_in"));
        assert_eq!(
            field_of(after(time::Duration::seconds(-1))),
            Some("expires_in")
        );
        assert_eq!(field_of(after(time::Duration::seconds(1))), None);
    }

    #[test]
    fn a_patch_is_held_to_the_same_rules() {
        let field =
            |mut patch: KeyPatch| validate_patch(&mut patch).err().map(|e| e.field().unwrap());
        assert_eq!(field(KeyPatch::default()), None);
        let name = |n: &str| KeyPatch {
            name: Some(n.to_owned()),
            ..KeyPatch::default()
        };
        assert_eq!(field(name(" ")), Some("name"));
        assert_eq!(field(name(&"n".repeat(MAX_NAME + 1))), Some("name"));
        assert_eq!(field(name("renamed")), None);
        let description = |d: Option<String>| KeyPatch {
            description: Some(d),
            ..KeyPatch::default()
        };
        assert_eq!(field(description(None)), None, "clearing it");
        assert_eq!(
            field(description(Some("d".repeat(MAX_DESCRIPTION + 1)))),
            Some("description")
        );
        let scopes = |s: Vec<String>| KeyPatch {
            scopes: Some(s),
            ..KeyPatch::default()
        };
        assert_eq!(field(scopes(vec!["a b".into()])), Some("scopes"));
        assert_eq!(field(scopes(vec!["read".into(), "read".into()])), None);
        let metadata = |m: serde_json::Value| KeyPatch {
            metadata: Some(m),
            ..KeyPatch::default()
        };
        assert_eq!(field(metadata(serde_json::json!([]))), Some("metadata"));
        assert_eq!(
            field(metadata(serde_json::json!({"k": "\u{0}"}))),
            Some("metadata")
        );
        assert_eq!(field(metadata(serde_json::json!({"k": "v"}))), None);
    }

    #[cfg(feature = "manage-api")]
    #[test]
    fn free_text_is_checked_field_by_field() {
        let field = |d: Option<&str>, m: Option<serde_json::Value>| {
            check_free_text(d, m.as_ref())
                .err()
                .map(|e| e.field().unwrap())
        };
        assert_eq!(field(None, None), None);
        assert_eq!(
            field(Some("ok ✓"), Some(serde_json::json!({"k": ["v"]}))),
            None
        );
        assert_eq!(field(Some("a\u{0}b"), None), Some("description"));
        assert_eq!(
            field(Some("a\u{0}b"), Some(serde_json::json!({"\n": 1}))),
            Some("description")
        );
        assert_eq!(
            field(None, Some(serde_json::json!({"\n": 1}))),
            Some("metadata")
        );
        assert_eq!(
            field(None, Some(serde_json::json!([true, null, 2, "\t"]))),
            Some("metadata")
        );
        assert_eq!(
            field(None, Some(serde_json::json!([true, null, 2, "t"]))),
            None
        );
    }
}
