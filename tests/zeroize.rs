//! Key material that is cheap to wipe is wiped: these are compile-time checks that the types
//! holding it implement `ZeroizeOnDrop` (the marker of a `Drop` that zeroizes).
//!
//! The reveal key's AES-256 key schedule lives in `aes::Aes256` inside `Aes256Gcm`: it is
//! wiped on drop only with the `zeroize` features of `aes-gcm`/`aes`, which keywarden enables.

use zeroize::ZeroizeOnDrop;

fn wiped_on_drop<T: ZeroizeOnDrop>() {}

#[test]
fn the_aead_key_schedule_is_wiped_on_drop() {
    wiped_on_drop::<aes::Aes256>();
    wiped_on_drop::<aes::Aes256Enc>();
}

#[test]
fn secrets_are_wiped_on_drop() {
    wiped_on_drop::<keywarden::Secret>();
}
