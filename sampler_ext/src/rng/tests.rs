use super::*;

#[test]
fn the_random_stream_is_pinned() {
    // These values define the stream: if a dependency update changes them, seeded results change
    // for every user, so this must fail loudly.
    let mut rng = SequenceRng::new(0);
    let raw: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
    assert_eq!(raw, PINNED_SEED_0);
    let mut rng = SequenceRng::new(0xDEAD_BEEF);
    let u: Vec<f64> = (0..3).map(|_| rng.next_uniform()).collect();
    assert_eq!(u, PINNED_UNIFORM_DEADBEEF);
}

// ChaCha20 with an all-zero key: the keystream starts 76 b8 e0 ad a0 f1 3d 90 (the published
// test vector), read as little-endian u64s. tests/sampler_ext/reference.py computes the same.
const PINNED_SEED_0: [u64; 3] = [
    10393729187455219830,
    2935650227004792128,
    1940362735889535677,
];
const PINNED_UNIFORM_DEADBEEF: [f64; 3] =
    [0.18775118230683296, 0.11398750826896875, 0.9025945118881066];
