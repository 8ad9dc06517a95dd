//! A sequence's sampling parameters: as the caller gives them ([`SamplerConfig`]) and checked,
//! with the facts that pick each step's road ([`Params`]).

use crate::error::SamplerError;

/// OpenAI allows at most 20 `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Temperatures below this are greedy, as in vLLM: dividing by a smaller one only risks overflow
/// and leaves a distribution that is greedy in all but name.
pub const GREEDY_BELOW_TEMPERATURE: f64 = 1e-5;

/// Largest vocabulary accepted: token ids are `int32` in llama.cpp and in the gRPC API.
pub const MAX_VOCAB_SIZE: usize = i32::MAX as usize;

/// The sampling parameters of one sequence, as given by the caller (not yet checked).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    pub seed: u64,
    pub temperature: f64,
    pub top_p: f64,
    pub frequency_penalty: f64,
    pub presence_penalty: f64,
    /// `(token id, bias)` pairs; a token id must not repeat.
    pub logit_bias: Vec<(i64, f64)>,
    pub top_logprobs: i64,
    /// Whether to report the chosen token's logprob (top logprobs are reported when asked for).
    pub logprobs: bool,
}

impl SamplerConfig {
    /// OpenAI's defaults: temperature 1, top-p 1, no penalties, no bias, no top logprobs.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            temperature: 1.0,
            top_p: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

/// `vocab_size` as a length, if it is in `1..=MAX_VOCAB_SIZE`.
pub fn check_vocab_size(vocab_size: i64) -> Result<usize, SamplerError> {
    usize::try_from(vocab_size)
        .ok()
        .filter(|&v| (1..=MAX_VOCAB_SIZE).contains(&v))
        .ok_or(SamplerError::VocabSize(vocab_size))
}

/// Checked parameters, and the facts about them that pick each step's road.
#[derive(Debug, Clone)]
pub struct Params {
    pub vocab_size: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub frequency_penalty: f64,
    pub presence_penalty: f64,
    /// Sorted by token id.
    pub logit_bias: Vec<(u32, f64)>,
    pub top_logprobs: usize,
    /// Whether the caller wants the chosen token's logprob.
    pub logprobs: bool,
    pub greedy: bool,
    pub nucleus: bool,
    pub penalised: bool,
}

fn check_range(
    name: &'static str,
    value: f64,
    ok: bool,
    allowed: &'static str,
) -> Result<(), SamplerError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(SamplerError::Parameter {
            name,
            value,
            allowed,
        })
    }
}

impl Params {
    /// Checks `config` for a vocabulary of `vocab_size` tokens (one [`check_vocab_size`] accepted).
    pub fn new(vocab_size: usize, config: &SamplerConfig) -> Result<Self, SamplerError> {
        let t = config.temperature;
        check_range("temperature", t, (0.0..=2.0).contains(&t), "in [0, 2]")?;
        let p = config.top_p;
        check_range("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
        for (name, value) in [
            ("frequency_penalty", config.frequency_penalty),
            ("presence_penalty", config.presence_penalty),
        ] {
            check_range(name, value, (-2.0..=2.0).contains(&value), "in [-2, 2]")?;
        }
        let top_logprobs = usize::try_from(config.top_logprobs)
            .ok()
            .filter(|&k| k <= MAX_TOP_LOGPROBS)
            .ok_or(SamplerError::TopLogprobs(config.top_logprobs))?;

        let mut logit_bias = Vec::with_capacity(config.logit_bias.len());
        for &(token, bias) in &config.logit_bias {
            let id = u32::try_from(token)
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or(SamplerError::BiasToken { token, vocab_size })?;
            if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
                return Err(SamplerError::BiasValue { token, bias });
            }
            logit_bias.push((id, bias));
        }
        logit_bias.sort_unstable_by_key(|&(id, _)| id);
        if let Some(pair) = logit_bias.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(SamplerError::BiasRepeated(i64::from(pair[0].0)));
        }

        Ok(Self {
            vocab_size,
            temperature: t,
            top_p: p,
            frequency_penalty: config.frequency_penalty,
            presence_penalty: config.presence_penalty,
            logit_bias,
            top_logprobs,
            logprobs: config.logprobs,
            greedy: t < GREEDY_BELOW_TEMPERATURE,
            nucleus: p < 1.0,
            penalised: config.frequency_penalty != 0.0 || config.presence_penalty != 0.0,
        })
    }
}

#[cfg(test)]
mod tests;
