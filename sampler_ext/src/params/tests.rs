use super::*;

#[test]
fn vocabulary_sizes_outside_1_to_i32_max_are_refused() {
    for bad in [0, -1, 1 << 31] {
        assert_eq!(check_vocab_size(bad), Err(SamplerError::VocabSize(bad)));
    }
    assert_eq!(check_vocab_size(1), Ok(1));
    assert_eq!(check_vocab_size(i64::from(i32::MAX)), Ok(MAX_VOCAB_SIZE));
}

#[test]
fn invalid_configs_are_refused() {
    let base = SamplerConfig::new(0);
    let bad = [
        SamplerConfig {
            temperature: -0.1,
            ..base.clone()
        },
        SamplerConfig {
            temperature: 2.1,
            ..base.clone()
        },
        SamplerConfig {
            temperature: f64::NAN,
            ..base.clone()
        },
        SamplerConfig {
            top_p: 0.0,
            ..base.clone()
        },
        SamplerConfig {
            top_p: 1.01,
            ..base.clone()
        },
        SamplerConfig {
            top_p: f64::NAN,
            ..base.clone()
        },
        SamplerConfig {
            frequency_penalty: 2.5,
            ..base.clone()
        },
        SamplerConfig {
            presence_penalty: -2.5,
            ..base.clone()
        },
        SamplerConfig {
            presence_penalty: f64::INFINITY,
            ..base.clone()
        },
        SamplerConfig {
            top_logprobs: 21,
            ..base.clone()
        },
        SamplerConfig {
            top_logprobs: -1,
            ..base.clone()
        },
        SamplerConfig {
            logit_bias: vec![(10, 1.0)],
            ..base.clone()
        },
        SamplerConfig {
            logit_bias: vec![(-1, 1.0)],
            ..base.clone()
        },
        SamplerConfig {
            logit_bias: vec![(1, 100.5)],
            ..base.clone()
        },
        SamplerConfig {
            logit_bias: vec![(1, f64::NAN)],
            ..base.clone()
        },
        SamplerConfig {
            logit_bias: vec![(3, 1.0), (3, 2.0)],
            ..base.clone()
        },
    ];
    for config in bad {
        assert!(Params::new(10, &config).is_err(), "accepted {config:?}");
    }
    let edges = SamplerConfig {
        temperature: 2.0,
        frequency_penalty: -2.0,
        presence_penalty: 2.0,
        top_logprobs: 20,
        logit_bias: vec![(9, -100.0), (0, 100.0)],
        ..base
    };
    assert!(Params::new(10, &edges).is_ok());
}
