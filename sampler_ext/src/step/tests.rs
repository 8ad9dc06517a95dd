//! The staged step held to a brute-force sampler written straight from the numbered stages in
//! the module docs (libm `exp`, full sorts, sums one by one).

use super::*;
use crate::params::{SamplerConfig, GREEDY_BELOW_TEMPERATURE};
use crate::sequence::Sequence;
use crate::test_inputs::Lcg;

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
