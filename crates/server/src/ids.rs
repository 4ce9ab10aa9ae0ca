//! Random identifiers: completion ids and request ids.

use rand::Rng;

/// `prefix` followed by 32 random hex digits (128 bits).
pub fn random_id(prefix: &str) -> String {
    let n: u128 = rand::rng().random();
    format!("{prefix}{n:032x}")
}
