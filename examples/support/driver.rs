//! What the callgrind drivers (`examples/hit_profile.rs`, `examples/cold_lines.rs`) share:
//! their request count and the order in which they read the keys.

/// The request count: the first command-line argument, else `default`.
pub fn count_arg(default: usize) -> usize {
    std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("a count"))
        .unwrap_or(default)
}

/// The keys' indexes in a fixed pseudo-random order (an LCG walk, the same in every run), so
/// the order is neither sequential nor different between two builds being compared.
pub struct KeyWalk {
    state: usize,
    len: usize,
}

impl KeyWalk {
    /// A walk over `len` keys.
    pub fn new(len: usize) -> Self {
        Self { state: 1, len }
    }

    /// The next key's index.
    pub fn next_index(&mut self) -> usize {
        self.state = self
            .state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.state >> 17) % self.len
    }
}
