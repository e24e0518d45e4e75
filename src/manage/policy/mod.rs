//! The one management policy both front ends (the HTTP API and the `keywarden` CLI) call:
//! what a key's fields may hold, how durations, expiries and grace periods parse, how a key
//! is shown as JSON, and what a `keys:admin` or `keys:self` caller may do.

#[cfg(feature = "manage-api")]
mod caller;
mod expiry;
#[cfg(feature = "manage-api")]
mod request;
mod validate;
mod view;

#[cfg(feature = "manage-api")]
pub(crate) use caller::{Caller, CallerError, ADMIN_SCOPE};
pub use expiry::{
    parse_duration, parse_grace, DurationParseError, ExpiresIn, GraceParseError, DEFAULT_GRACE,
};
#[cfg(feature = "manage-api")]
pub(crate) use request::{
    nullable, parse_credits, parse_rate_limit, parse_refill, parse_time, CreateRequest,
    PatchRequest,
};
#[cfg(feature = "webhooks")]
pub(crate) use validate::check_free_text;
pub(crate) use validate::{validate_new, validate_owner, validate_patch};
pub use view::{CreatedKeyView, KeyPageView, KeyView};
