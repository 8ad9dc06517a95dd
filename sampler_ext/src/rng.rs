//! The per-sequence random stream.
//!
//! The stream must give the same numbers for the same seed on every platform and every build,
//! so it is ChaCha20 keyed directly by the seed (no seed-expansion helper whose algorithm a
//! dependency could change), and uniforms are made here rather than by a `rand` distribution.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// A seeded, value-stable source of uniform numbers in `[0, 1)`.
#[derive(Debug, Clone)]
pub struct SequenceRng {
    inner: ChaCha20Rng,
}

impl SequenceRng {
    /// The ChaCha20 key is the seed's 8 little-endian bytes followed by 24 zero bytes;
    /// stream 0, block counter 0.
    pub fn new(seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        Self {
            inner: ChaCha20Rng::from_seed(key),
        }
    }

    /// The top 53 bits of the next `u64`, scaled by 2^-53: every value is exactly representable,
    /// so the result is uniform on the 2^53 evenly spaced points of `[0, 1)`.
    pub fn next_uniform(&mut self) -> f64 {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        (self.inner.next_u64() >> 11) as f64 * SCALE
    }

    /// The raw next `u64`; exposed so tests can pin the stream itself.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
}

#[cfg(test)]
mod tests;
