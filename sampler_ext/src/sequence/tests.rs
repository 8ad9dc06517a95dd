//! A sequence stepped one row at a time, as a batch of one steps it: every stage's behaviour that
//! a caller can see.

use super::*;

/// The logprobs' normaliser is a fast f32 sum, documented (`logprobs.rs`) as within about 1e-6 of
/// the exact `log(sum(exp(logits)))`.
const NORMALISER_ERROR: f64 = 1e-6;

/// What one step chose: the token, its raw logprob and the top logprobs.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    token: u32,
    logprob: f64,
    top_logprobs: Vec<(u32, f64)>,
}

/// A [`Sequence`] with its own scratch space, each step committed as soon as it is chosen.
#[derive(Debug, Clone)]
struct Stepper {
    sequence: Sequence,
    scratch: Scratch,
}

impl Stepper {
    fn sample(&mut self, logits: &[f32]) -> Result<Sample, SamplerError> {
        let pending = self.sequence.choose(logits, None, &mut self.scratch)?;
        self.sequence.commit(&pending);
        Ok(Sample {
            token: pending.token,
            logprob: pending.logprob,
            top_logprobs: self.scratch.top_logprobs.clone(),
        })
    }

    fn record(&mut self, token: i64) -> Result<(), SamplerError> {
        self.sequence.record(token)
    }

    fn generated(&self) -> usize {
        self.sequence.state.generated()
    }
}

/// A sequence over `vocab_size` tokens that reports logprobs.
fn sampler(vocab_size: usize, config: SamplerConfig) -> Stepper {
    let config = SamplerConfig {
        logprobs: true,
        ..config
    };
    Stepper {
        sequence: Sequence::new(vocab_size, &config).expect("valid config"),
        scratch: Scratch::default(),
    }
}

/// Greedy over two tokens, with these frequency and presence penalties.
fn greedy_of_two(frequency_penalty: f64, presence_penalty: f64) -> Stepper {
    sampler(
        2,
        SamplerConfig {
            frequency_penalty,
            presence_penalty,
            ..greedy()
        },
    )
}

fn greedy() -> SamplerConfig {
    SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::new(0)
    }
}

#[test]
fn greedy_picks_the_maximum() {
    let mut s = sampler(5, greedy());
    let out = s.sample(&[0.1, 2.0, -1.0, 1.5, 0.0]).unwrap();
    assert_eq!(out.token, 1);
    assert_eq!(s.generated(), 1);
}

#[test]
fn greedy_ties_go_to_the_lowest_id() {
    let mut s = sampler(4, greedy());
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 3.0]).unwrap().token, 1);
    // Same through the adjusted path (a bias on an unrelated token).
    let mut s = sampler(
        4,
        SamplerConfig {
            logit_bias: vec![(0, -1.0)],
            ..greedy()
        },
    );
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 3.0]).unwrap().token, 1);
}

#[test]
fn bias_changes_the_greedy_choice() {
    let mut s = sampler(
        3,
        SamplerConfig {
            logit_bias: vec![(2, 5.0), (1, -100.0)],
            ..greedy()
        },
    );
    assert_eq!(s.sample(&[0.0, 4.0, 0.0]).unwrap().token, 2);
}

#[test]
fn frequency_penalty_grows_with_each_repeat() {
    // Token 0 leads by 1.5; each use costs 1, so it wins twice, then token 1 takes over.
    let mut s = greedy_of_two(1.0, 0.0);
    let logits = [1.5, 0.0];
    let tokens: Vec<u32> = (0..3).map(|_| s.sample(&logits).unwrap().token).collect();
    assert_eq!(tokens, [0, 0, 1]);
    assert_eq!(s.sequence.state.count(0), 2);
}

#[test]
fn presence_penalty_applies_once() {
    let mut s = greedy_of_two(0.0, 1.0);
    let logits = [1.5, 0.0];
    let tokens: Vec<u32> = (0..4).map(|_| s.sample(&logits).unwrap().token).collect();
    // After one use, 0.5 > 0 still; once token 1 is used too both are penalised equally.
    assert_eq!(tokens, [0, 0, 0, 0]);
    let mut s = greedy_of_two(0.0, 2.0);
    let tokens: Vec<u32> = (0..3).map(|_| s.sample(&logits).unwrap().token).collect();
    assert_eq!(tokens, [0, 1, 0]);
}

#[test]
fn recorded_tokens_are_penalised() {
    let mut s = greedy_of_two(0.0, 2.0);
    s.record(0).unwrap();
    assert_eq!(s.generated(), 1);
    assert_eq!(s.sample(&[1.5, 0.0]).unwrap().token, 1);
    assert!(matches!(
        s.record(2),
        Err(SamplerError::Token { token: 2, .. })
    ));
    assert!(matches!(s.record(-1), Err(SamplerError::Token { .. })));
    assert_eq!(s.generated(), 2);
}

#[test]
fn logprobs_are_raw_log_softmax() {
    let logits = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
    let mut s = sampler(
        4,
        SamplerConfig {
            temperature: 0.0,
            logit_bias: vec![(0, 100.0)],
            top_logprobs: 3,
            ..SamplerConfig::new(0)
        },
    );
    let out = s.sample(&logits).unwrap();
    let log_z = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    assert_eq!(out.token, 0);
    assert!((out.logprob - (1.0 - log_z)).abs() < NORMALISER_ERROR);
    let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [2, 1, 0]);
    assert!((out.top_logprobs[0].1 - (3.0 - log_z)).abs() < NORMALISER_ERROR);
}

#[test]
fn top_logprobs_ties_by_lower_id_and_never_exceed_the_vocabulary() {
    let mut s = sampler(
        4,
        SamplerConfig {
            top_logprobs: 20,
            ..greedy()
        },
    );
    let out = s.sample(&[0.0, 1.0, 1.0, f32::NEG_INFINITY]).unwrap();
    let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [1, 2, 0, 3]);
    assert_eq!(out.top_logprobs[3].1, f64::NEG_INFINITY);

    let mut s = sampler(
        5,
        SamplerConfig {
            top_logprobs: 2,
            ..greedy()
        },
    );
    let out = s.sample(&[5.0, 1.0, 5.0, 5.0, 0.0]).unwrap();
    let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [0, 2]);
}

#[test]
fn a_single_token_vocabulary_always_gives_it() {
    for temperature in [0.0, 1.0] {
        let mut s = sampler(
            1,
            SamplerConfig {
                temperature,
                top_p: 0.5,
                ..SamplerConfig::new(3)
            },
        );
        let out = s.sample(&[-7.0]).unwrap();
        assert_eq!((out.token, out.logprob), (0, 0.0));
    }
}

#[test]
fn only_the_possible_token_is_drawn() {
    let mut logits = vec![f32::NEG_INFINITY; 100];
    logits[42] = -3.0;
    for top_p in [1.0, 0.3] {
        let mut s = sampler(
            100,
            SamplerConfig {
                top_p,
                ..SamplerConfig::new(9)
            },
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&logits).unwrap().token, 42);
        }
    }
}

#[test]
fn tiny_top_p_keeps_only_the_most_likely_token() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let best = logits.iter().position(|&x| x == max).unwrap();
    let mut s = sampler(
        1000,
        SamplerConfig {
            top_p: 1e-9,
            ..SamplerConfig::new(1)
        },
    );
    for _ in 0..20 {
        assert_eq!(s.sample(&logits).unwrap().token as usize, best);
    }
}

#[test]
fn same_seed_same_tokens_and_different_seed_different_tokens() {
    let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
    let run = |seed: u64| -> Vec<u32> {
        let mut s = sampler(
            50,
            SamplerConfig {
                top_p: 0.9,
                ..SamplerConfig::new(seed)
            },
        );
        (0..64).map(|_| s.sample(&logits).unwrap().token).collect()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    assert_eq!(run(7), PINNED_TOKENS_SEED_7.to_vec());
}

// Also what tests/sampler_ext/reference.py draws for this case.
const PINNED_TOKENS_SEED_7: [u32; 64] = [
    12, 3, 8, 7, 46, 20, 13, 48, 12, 46, 8, 3, 20, 11, 16, 13, 16, 47, 11, 45, 48, 40, 19, 18, 8,
    12, 45, 11, 37, 26, 34, 19, 27, 18, 12, 48, 5, 7, 24, 0, 24, 39, 44, 45, 12, 18, 33, 5, 24, 34,
    10, 12, 37, 12, 9, 25, 23, 11, 40, 15, 3, 13, 22, 10,
];

#[test]
fn invalid_logits_are_refused_and_change_nothing() {
    let mut s = sampler(3, SamplerConfig::new(5));
    let reference = s.clone().sample(&[0.0, 1.0, 2.0]).unwrap();
    assert_eq!(
        s.sample(&[]),
        Err(SamplerError::Length {
            expected: 3,
            got: 0
        })
    );
    assert_eq!(
        s.sample(&[0.0; 4]),
        Err(SamplerError::Length {
            expected: 3,
            got: 4
        })
    );
    assert!(matches!(
        s.sample(&[0.0, f32::NAN, 0.0]),
        Err(SamplerError::NonFiniteLogit { token: 1, .. })
    ));
    assert!(matches!(
        s.sample(&[0.0, 0.0, f32::INFINITY]),
        Err(SamplerError::NonFiniteLogit { token: 2, .. })
    ));
    assert_eq!(
        s.sample(&[f32::NEG_INFINITY; 3]),
        Err(SamplerError::AllImpossible)
    );
    assert_eq!(s.generated(), 0);
    assert_eq!(s.sample(&[0.0, 1.0, 2.0]).unwrap(), reference);
}

#[test]
fn extreme_logits_do_not_overflow() {
    let logits = [f32::MAX, f32::MIN, f32::MAX, 0.0];
    for temperature in [0.0, 1e-5, 2.0] {
        let mut s = sampler(
            4,
            SamplerConfig {
                temperature,
                top_p: 0.5,
                logit_bias: vec![(0, 100.0)],
                top_logprobs: 4,
                ..SamplerConfig::new(0)
            },
        );
        let out = s.sample(&logits).unwrap();
        assert_eq!(out.token, 0);
        assert!(out.logprob.is_finite());
        assert!(out.top_logprobs.iter().all(|&(_, lp)| lp.is_finite()));
    }
}
