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

/// NUL cannot be stored (PostgreSQL rejects it in TEXT and JSONB): refuse it at the edge.
fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v))
        }
        _ => false,
    }
}

fn check_description(description: &str) -> Result<(), ManageError> {
    if description.len() > MAX_DESCRIPTION {
        return Err(ManageError::invalid(
            "description",
            format!("description is longer than {MAX_DESCRIPTION} bytes"),
        ));
    }
    if description.contains('\0') {
        return Err(ManageError::invalid(
            "description",
            "description contains a NUL character",
        ));
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
    if contains_nul(metadata) {
        return Err(ManageError::invalid(
            "metadata",
            "metadata contains a NUL character",
        ));
    }
    Ok(())
}

pub(crate) fn validate_new(mut new: NewKey) -> Result<NewKey, ManageError> {
    check_text("name", &new.name, MAX_NAME)?;
    if let Some(description) = &new.description {
        check_description(description)?;
    }
    check_token("collection", &new.collection, MAX_SLUG)?;
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

/// Control characters in free text are refused up front rather than as a store error later:
/// Postgres refuses NUL in TEXT and JSONB. Metadata is checked at every depth, keys and values.
#[cfg(feature = "manage-api")]
pub(crate) fn check_free_text(
    description: Option<&str>,
    metadata: Option<&serde_json::Value>,
) -> Result<(), ManageError> {
    use serde_json::Value;
    fn dirty(text: &str) -> bool {
        text.chars().any(char::is_control)
    }
    // serde_json caps nesting at 128 levels, which bounds the recursion.
    fn dirty_json(value: &Value) -> bool {
        match value {
            Value::String(text) => dirty(text),
            Value::Array(items) => items.iter().any(dirty_json),
            Value::Object(members) => members.iter().any(|(k, v)| dirty(k) || dirty_json(v)),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    if description.is_some_and(dirty) {
        Err(ManageError::invalid(
            "description",
            "description must not contain control characters",
        ))
    } else if metadata.is_some_and(dirty_json) {
        Err(ManageError::invalid(
            "metadata",
            "metadata must not contain control characters",
        ))
    } else {
        Ok(())
    }
}
