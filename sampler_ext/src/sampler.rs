//! Choosing the next token of a sequence from its logits.
//!
//! For each token, a step ([`crate::step::choose`]) does, in this order:
//!
//! 1. **Raw scan.** Refuse NaN and +inf logits and a row that is all `-inf`; find the maximum of
//!    each block of 256 logits.
//! 2. **Logprobs** (only if asked for): the log-softmax of these *raw* logits, as OpenAI reports
//!    them: the mask, logit bias, penalties, temperature and top-p do not change them. The `k` best
//!    `(token, logprob)` pairs, ties to the lower id.
//! 3. **Mask** (optional): a token whose bit is clear has `value = -inf`. A mask of all ones is no
//!    mask.
//! 4. **Logit bias.** `value[t] = logit[t] + bias[t]`.
//! 5. **Penalties** over the tokens this sequence has generated (its history):
//!    `value[t] -= frequency_penalty * count[t] + presence_penalty`, for each `t` with `count[t] > 0`.
//! 6. **Temperature.** Below [`GREEDY_BELOW_TEMPERATURE`] the token is the argmax of `value`, ties
//!    going to the lowest token id (as llama.cpp's greedy sampler), and no random number is drawn.
//!    Otherwise `weight = exp(value / temperature - max)`.
//! 7. **Top-p.** With `top_p < 1`, keep the fewest tokens, taken by decreasing weight (ties: lower
//!    id first), whose weights summed in that order reach `top_p * total`. At least one token is
//!    always kept.
//! 8. **Draw.** One uniform `u` in `[0, 1)` from the sequence's ChaCha20 stream; walking the kept
//!    tokens in increasing id order, the token is the first whose running weight sum exceeds
//!    `u * kept_total`.
//! 9. **Record** the token in the history, so that later penalties see it.
//!
//! Stages 3 to 5 touch only the tokens they concern, and stages 7 and 8 only the blocks that can
//! matter; see `step.rs` for how, and `kernels.rs` for the vectorised passes.
//!
//! The result depends only on the seed and the logits, up to rounding: weights are f64
//! exponentials within two ulps of libm's, and sums are taken in blocks rather than one by one,
//! so a draw can differ from exact arithmetic only when `u` lands within about 1e-15 (relative)
//! of a boundary between two tokens. Fast f32 sums are used only where their error bound shows
//! they cannot change the outcome.

use crate::error::SamplerError;
use crate::rng::SequenceRng;
use crate::step::{self, Pending, Scratch};

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

/// The tokens a sequence has generated so far, as counts for the penalties.
#[derive(Debug, Clone, Default)]
pub struct SequenceState {
    /// `(token, count)`, sorted by token, so that a step merges it with the sorted bias.
    counts: Vec<(u32, u32)>,
    generated: usize,
}

impl SequenceState {
    pub fn record(&mut self, token: u32) {
        match self.counts.binary_search_by_key(&token, |&(id, _)| id) {
            Ok(at) => self.counts[at].1 += 1,
            Err(at) => self.counts.insert(at, (token, 1)),
        }
        self.generated += 1;
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn count(&self, token: u32) -> u32 {
        self.counts
            .binary_search_by_key(&token, |&(id, _)| id)
            .map_or(0, |at| self.counts[at].1)
    }

    pub fn counts(&self) -> &[(u32, u32)] {
        &self.counts
    }
}

/// One sequence: its parameters, history and random stream. Steps read it; only
/// [`Sequence::commit`] changes it, so a failed step (or a failed row of a batch) changes nothing.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub params: Params,
    pub state: SequenceState,
    pub rng: SequenceRng,
}

impl Sequence {
    /// A sequence over `vocab_size` tokens (one [`check_vocab_size`] accepted).
    pub fn new(vocab_size: usize, config: &SamplerConfig) -> Result<Self, SamplerError> {
        Ok(Self {
            params: Params::new(vocab_size, config)?,
            state: SequenceState::default(),
            rng: SequenceRng::new(config.seed),
        })
    }

    /// Steps 1 to 8; see [`crate::step::choose`].
    pub fn choose(
        &self,
        logits: &[f32],
        mask: Option<&[u32]>,
        scratch: &mut Scratch,
    ) -> Result<Pending, SamplerError> {
        step::choose(&self.params, &self.state, &self.rng, logits, mask, scratch)
    }

    /// Step 9: applies a step's outcome.
    pub fn commit(&mut self, pending: &Pending) {
        if let Some(rng) = &pending.rng {
            self.rng = rng.clone();
        }
        self.state.record(pending.token);
    }

    /// Adds a token to the history without sampling (e.g. one forced by constrained decoding).
    pub fn record(&mut self, token: i64) -> Result<(), SamplerError> {
        let id = u32::try_from(token)
            .ok()
            .filter(|&id| (id as usize) < self.params.vocab_size)
            .ok_or(SamplerError::Token {
                token,
                vocab_size: self.params.vocab_size,
            })?;
        self.state.record(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
