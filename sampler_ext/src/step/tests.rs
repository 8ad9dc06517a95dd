//! The staged step held to a brute-force sampler written straight from the numbered stages in
//! the module docs (libm `exp`, full sorts, sums one by one).

use super::*;
use crate::batch::BatchSampler;
use crate::sampler::{SamplerConfig, Sequence, GREEDY_BELOW_TEMPERATURE};

/// A small deterministic generator for test inputs (not the sampler's stream).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn brute_force(
    config: &SamplerConfig,
    history: &[u32],
    logits: &[f32],
    mask: Option<&[bool]>,
    u: f64,
) -> u32 {
    let mut values: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
    if let Some(mask) = mask {
        for (v, &ok) in values.iter_mut().zip(mask) {
            if !ok {
                *v = f64::NEG_INFINITY;
            }
        }
    }
    for &(id, b) in &config.logit_bias {
        values[id as usize] += b;
    }
    if config.frequency_penalty != 0.0 || config.presence_penalty != 0.0 {
        let mut counts = std::collections::BTreeMap::new();
        for &t in history {
            *counts.entry(t).or_insert(0u32) += 1;
        }
        for (&t, &c) in &counts {
            values[t as usize] -= config.frequency_penalty * f64::from(c) + config.presence_penalty;
        }
    }
    if config.temperature < GREEDY_BELOW_TEMPERATURE {
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        return values.iter().position(|&v| v == max).unwrap() as u32;
    }
    let scaled: Vec<f64> = values.iter().map(|v| v / config.temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&j| weights[j] > 0.0).collect();
    if config.top_p < 1.0 {
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let mut mass = 0.0;
        let mut kept = order.len();
        for (i, &j) in order.iter().enumerate() {
            mass += weights[j];
            if mass >= config.top_p * total {
                kept = i + 1;
                break;
            }
        }
        order.truncate(kept);
        order.sort_unstable();
    }
    let kept_total: f64 = order.iter().map(|&j| weights[j]).sum();
    let mut mass = 0.0;
    for &j in &order {
        mass += weights[j];
        if mass > u * kept_total {
            return j as u32;
        }
    }
    *order.last().unwrap() as u32
}

fn logits_like_a_model(rng: &mut Lcg, vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|_| {
            let base = (rng.next() - 0.5) * 8.0 - 4.0;
            (if rng.next() < 0.002 {
                base + 15.0 * rng.next()
            } else {
                base
            }) as f32
        })
        .collect()
}

#[test]
fn steps_match_the_brute_force_sampler() {
    let mut rng = Lcg(7);
    let configs = [
        (1.0, 1.0, 0.0, 0.0),
        (0.8, 0.9, 0.5, 0.5),
        (1.3, 0.95, -0.5, 1.0),
        (2.0, 0.05, 2.0, -2.0),
        (0.0, 1.0, 1.0, 0.5),
    ];
    for vocab in [1usize, 2, 255, 256, 257, 5000, 70_000, 130_000] {
        for (case, &(temperature, top_p, frequency_penalty, presence_penalty)) in
            configs.iter().enumerate()
        {
            let logit_bias: Vec<(i64, f64)> = (0..vocab.min(50))
                .map(|i| ((i * 7919 % vocab) as i64, (rng.next() - 0.5) * 20.0))
                .collect();
            let mut logit_bias = logit_bias;
            logit_bias.sort_by_key(|&(t, _)| t);
            logit_bias.dedup_by_key(|&mut (t, _)| t);
            let config = SamplerConfig {
                temperature,
                top_p,
                frequency_penalty,
                presence_penalty,
                logit_bias,
                ..SamplerConfig::new(case as u64)
            };
            let mut sequence = Sequence::new(vocab, &config).unwrap();
            let mut history = Vec::new();
            let mut scratch = Scratch::default();
            for step in 0..6 {
                let logits = logits_like_a_model(&mut rng, vocab);
                let mask: Option<Vec<bool>> = (step % 3 == 2)
                    .then(|| (0..vocab).map(|j| j == 0 || rng.next() < 0.3).collect());
                let words = mask.as_ref().map(|m| {
                    let mut words = vec![0u32; mask_words(vocab)];
                    for (j, &ok) in m.iter().enumerate() {
                        words[j / 32] |= u32::from(ok) << (j % 32);
                    }
                    words
                });
                let u = sequence.rng.clone().next_uniform();
                let expected = brute_force(&config, &history, &logits, mask.as_deref(), u);
                let pending = sequence
                    .choose(&logits, words.as_deref(), &mut scratch)
                    .unwrap();
                assert_eq!(pending.token, expected, "V {vocab} case {case} step {step}");
                sequence.commit(&pending);
                history.push(pending.token);
            }
        }
    }
}

#[test]
fn a_mask_that_allows_nothing_possible_is_refused() {
    let sequence = Sequence::new(40, &SamplerConfig::new(0)).unwrap();
    let mut logits = vec![0.0f32; 40];
    logits[3] = f32::NEG_INFINITY;
    let mut mask = vec![0u32; 2];
    mask[0] = 1 << 3; // only a token that is impossible anyway
    let result = sequence.choose(&logits, Some(&mask), &mut Scratch::default());
    assert_eq!(result.unwrap_err(), SamplerError::NothingAllowed);
    let result = sequence.choose(&logits, Some(&[0u32]), &mut Scratch::default());
    assert!(matches!(
        result,
        Err(SamplerError::MaskLength {
            expected: 2,
            got: 1
        })
    ));
}

#[test]
fn the_nucleus_crossing_is_the_brute_force_one() {
    let mut rng = Lcg(3);
    for n in [1usize, 5, 64, 65, 300, 5000] {
        let mut candidates: Vec<(u32, f64)> = (0..n)
            .map(|i| (i as u32, (rng.next() * 4.0).floor()))
            .collect();
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        for p in [1e-9, 0.3, 0.9, 0.999, 1.0] {
            let mut sorted = candidates.clone();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut mass = 0.0;
            let expected = sorted.iter().position(|c| {
                mass += c.1;
                mass >= p * total
            });
            let key = |i: usize| Crossing {
                kept: i + 1,
                weight: sorted[i].1,
                id: sorted[i].0,
            };
            let (mut buf, mut bucket) = (Vec::new(), Vec::new());
            let keys = crossing_keys(&candidates, (p * total, p * total), &mut buf, &mut bucket);
            assert_eq!(keys, (expected.map(key), expected.map(key)), "n {n} p {p}");
            let (lo, hi) = crossing(&mut candidates, (p * total, p * total));
            assert_eq!((lo, hi), (expected, expected), "n {n} p {p}");
            if let Some(i) = expected {
                assert_eq!(&candidates[..=i], &sorted[..=i]);
            }
        }
    }
}

#[test]
fn the_nucleus_crossing_of_two_thresholds_is_the_brute_force_one() {
    // Weights as the sampler makes them (exponentials spread over many histogram buckets, some
    // below the last bucket), thresholds apart as the fast bound makes them.
    let mut rng = Lcg(11);
    for n in [1usize, 2, 63, 64, 65, 1000, 4000] {
        let candidates: Vec<(u32, f64)> = (0..n)
            .map(|i| (i as u32 * 3, (-30.0 * rng.next() * rng.next()).exp()))
            .collect();
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut sorted = candidates.clone();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let first_reaching = |t: f64| {
            let mut mass = 0.0;
            sorted.iter().position(|c| {
                mass += c.1;
                mass >= t
            })
        };
        for p in [1e-12, 0.1, 0.5, 0.9, 0.99, 1.0, 1.5] {
            for spread in [0.0, 1e-9, 1e-3, 0.2] {
                let (lo, hi) = (p * total * (1.0 - spread), p * total * (1.0 + spread));
                let mut shuffled = candidates.clone();
                let (a, b) = crossing(&mut shuffled, (lo, hi));
                let expected = (first_reaching(lo), first_reaching(hi));
                let key = |i: usize| Crossing {
                    kept: i + 1,
                    weight: sorted[i].1,
                    id: sorted[i].0,
                };
                let (mut buf, mut bucket) = (Vec::new(), Vec::new());
                assert_eq!(
                    crossing_keys(&candidates, (lo, hi), &mut buf, &mut bucket),
                    (expected.0.map(key), expected.1.map(key)),
                    "keys: n {n} p {p} spread {spread}"
                );
                assert_eq!((a, b), expected, "n {n} p {p} spread {spread}");
                if let Some(i) = b.or(a) {
                    assert_eq!(
                        &shuffled[..=i],
                        &sorted[..=i],
                        "n {n} p {p} spread {spread}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_failed_row_leaves_every_sequence_unchanged() {
    let mut batch = BatchSampler::new(8).unwrap();
    let mut twin = BatchSampler::new(8).unwrap();
    for b in [&mut batch, &mut twin] {
        b.add(
            1,
            &SamplerConfig {
                top_p: 0.9,
                ..SamplerConfig::new(1)
            },
        )
        .unwrap();
        b.add(2, &SamplerConfig::new(2)).unwrap();
    }
    let mut logits = vec![0.5f32; 16];
    logits[12] = f32::NAN;
    let error = batch.sample(&logits, &[1, 2], None).unwrap_err();
    assert_eq!(
        error.to_string(),
        "row 1 (key 2): logit of token 4 is NaN; logits must not be NaN or +inf"
    );
    assert!(matches!(
        batch.sample(&logits[..8], &[3], None),
        Err(SamplerError::Row { row: 0, key: 3, .. })
    ));
    assert_eq!(batch.generated(1).unwrap(), 0);
    let good: Vec<f32> = (0..16).map(|i| (i % 5) as f32).collect();
    for _ in 0..5 {
        assert_eq!(
            batch.sample(&good, &[1, 2], None).unwrap().tokens,
            twin.sample(&good, &[1, 2], None).unwrap().tokens
        );
    }
}

#[test]
fn masks_read_bit_j_mod_32_of_word_j_div_32() {
    let mask = [0b101u32, 1 << 31, 0];
    assert!(is_allowed(&mask, 0) && !is_allowed(&mask, 1) && is_allowed(&mask, 2));
    assert!(is_allowed(&mask, 63) && !is_allowed(&mask, 64));
    assert!(allows_everything(&[u32::MAX, 0b111], 35));
    assert!(!allows_everything(&[u32::MAX, 0b101], 35));
    let logits: Vec<f32> = (0..70).map(|i| i as f32).collect();
    let mut out = vec![0.0; 70];
    for k in [Kernels::BASELINE, *Kernels::get()] {
        (k.apply_mask)(&logits, &mask, &mut out);
        for (j, &x) in out.iter().enumerate() {
            assert_eq!(
                x,
                if is_allowed(&mask, j) {
                    j as f32
                } else {
                    f32::NEG_INFINITY
                },
                "{} {j}",
                k.name
            );
        }
    }
}
