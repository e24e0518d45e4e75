//! What a key's fields may hold: one rule for every front end.

use super::super::{ExpiresIn, ManageError, NewKey};
use crate::store::KeyPatch;

/// Longest accepted name, description, subject and metadata, in bytes.
const MAX_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 2_000;
const MAX_SUBJECT: usize = 256;
const MAX_SLUG: usize = 64;
const MAX_SCOPE: usize = 128;
const MAX_SCOPES: usize = 100;
const MAX_METADATA: usize = 16 * 1024;

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

pub(crate) fn validate_patch(patch: &KeyPatch) -> Result<(), ManageError> {
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
                validate_patch(&patch).unwrap_err().field(),
                Some("description")
            );
        }
        let clean = NewKey::new("naïve ✓", "u")
            .description("café ✓")
            .metadata(serde_json::json!({"ünïcode": ["fine", {"nested": "too"}]}));
        assert!(validate_new(clean).is_ok());
    }
}
