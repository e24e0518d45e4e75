//! The keywarden CLI (placeholder).
fn main() {}
