//! Choosing the next token of one sequence from its logits.
//!
//! For each token, [`SequenceSampler::sample`] does, in this order:
//!
//! 1. **Raw scan.** Refuse NaN and +inf logits; find the raw maximum (and its lowest token id) and
//!    the `top_logprobs` best raw logits. Logprobs are the log-softmax of these *raw* logits, as
//!    OpenAI reports them: logit bias, penalties, temperature and top-p do not change them.
//! 2. **Logit bias.** `value[t] = logit[t] + bias[t]`.
//! 3. **Penalties** over the tokens this sequence has generated (its history):
//!    `value[t] -= frequency_penalty * count[t] + presence_penalty`, for each `t` with `count[t] > 0`.
//! 4. **Temperature.** Below [`GREEDY_BELOW_TEMPERATURE`] the token is the argmax of `value`, ties
//!    going to the lowest token id (as llama.cpp's greedy sampler), and no random number is drawn.
//!    Otherwise `value /= temperature` and `weight = exp(value - max(value))`.
//! 5. **Top-p.** With `top_p < 1`, keep the fewest tokens, taken by decreasing weight (ties: lower
//!    id first), whose weights summed in that order reach `top_p * total`, where `total` is the sum
//!    of all weights in id order. At least one token is always kept.
//! 6. **Draw.** One uniform `u` in `[0, 1)` from the sequence's ChaCha20 stream; walking the kept
//!    tokens in increasing id order, the token is the first whose running weight sum exceeds
//!    `u * kept_total` (`kept_total` summed in the same order).
//! 7. **Record** the token in the history, so that later penalties see it.
//!
//! All arithmetic after the raw scan is `f64` and every sum is sequential in the order stated, so
//! the result depends only on the seed and the logits, and on `exp`, whose last bit may differ
//! between math libraries (which can only matter when a draw lands within an ulp of a boundary).

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::error::SamplerError;
use crate::rng::SequenceRng;

/// OpenAI allows at most 20 `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Temperatures below this are greedy, as in vLLM: dividing by a smaller one only risks overflow
/// and leaves a distribution that is greedy in all but name.
pub const GREEDY_BELOW_TEMPERATURE: f64 = 1e-5;

/// Largest vocabulary accepted: token ids are `int32` in llama.cpp and in the gRPC API.
pub const MAX_VOCAB_SIZE: usize = i32::MAX as usize;

/// Nucleus selection sorts the heaviest tokens in chunks of this size, doubling each time, so that
/// a peaked distribution (the usual case) sorts a few dozen tokens instead of the vocabulary.
const FIRST_NUCLEUS_CHUNK: usize = 64;

/// The sampling parameters of one sequence, as given by the caller (not yet validated).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    pub vocab_size: i64,
    pub seed: u64,
    pub temperature: f64,
    pub top_p: f64,
    pub frequency_penalty: f64,
    pub presence_penalty: f64,
    /// `(token id, bias)` pairs; a token id must not repeat.
    pub logit_bias: Vec<(i64, f64)>,
    pub top_logprobs: i64,
}

impl SamplerConfig {
    /// OpenAI's defaults: temperature 1, top-p 1, no penalties, no bias, no top logprobs.
    pub fn new(vocab_size: i64, seed: u64) -> Self {
        Self {
            vocab_size,
            seed,
            temperature: 1.0,
            top_p: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            top_logprobs: 0,
        }
    }
}

/// What one call of [`SequenceSampler::sample`] chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub token: u32,
    /// Raw log-softmax of the chosen token.
    pub logprob: f64,
    /// `min(top_logprobs, vocab_size)` pairs `(token, raw logprob)`, most likely first, ties by
    /// lower id.
    pub top_logprobs: Vec<(u32, f64)>,
}

/// The tokens a sequence has generated so far, as counts for the penalties.
#[derive(Debug, Clone, Default)]
pub struct SequenceState {
    counts: HashMap<u32, u32>,
    generated: usize,
}

impl SequenceState {
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
        self.generated += 1;
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn count(&self, token: u32) -> u32 {
        self.counts.get(&token).copied().unwrap_or(0)
    }
}

/// Buffers of vocabulary size, allocated on first use and kept between tokens.
#[derive(Debug, Clone, Default)]
struct Scratch {
    values: Vec<f64>,
    order: Vec<u32>,
    top: Vec<(u32, f32)>,
}

/// Facts about the configuration worked out once, so each token takes the shortest road.
#[derive(Debug, Clone, Copy)]
struct Plan {
    greedy: bool,
    nucleus: bool,
    penalised: bool,
}

/// The sampler of one sequence: validated parameters, history, random stream and scratch space.
#[derive(Debug, Clone)]
pub struct SequenceSampler {
    vocab_size: usize,
    temperature: f64,
    top_p: f64,
    frequency_penalty: f64,
    presence_penalty: f64,
    /// Sorted by token id.
    logit_bias: Vec<(u32, f64)>,
    top_logprobs: usize,
    plan: Plan,
    state: SequenceState,
    rng: SequenceRng,
    scratch: Scratch,
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

impl SequenceSampler {
    pub fn new(config: SamplerConfig) -> Result<Self, SamplerError> {
        let vocab_size = usize::try_from(config.vocab_size)
            .ok()
            .filter(|&v| (1..=MAX_VOCAB_SIZE).contains(&v))
            .ok_or(SamplerError::VocabSize(config.vocab_size))?;
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

        let plan = Plan {
            greedy: t < GREEDY_BELOW_TEMPERATURE,
            nucleus: p < 1.0,
            penalised: config.frequency_penalty != 0.0 || config.presence_penalty != 0.0,
        };
        Ok(Self {
            vocab_size,
            temperature: t,
            top_p: p,
            frequency_penalty: config.frequency_penalty,
            presence_penalty: config.presence_penalty,
            logit_bias,
            top_logprobs,
            plan,
            state: SequenceState::default(),
            rng: SequenceRng::new(config.seed),
            scratch: Scratch::default(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn generated(&self) -> usize {
        self.state.generated()
    }

    pub fn state(&self) -> &SequenceState {
        &self.state
    }

    /// Adds a token to the history without sampling (e.g. one forced by constrained decoding).
    pub fn record(&mut self, token: i64) -> Result<(), SamplerError> {
        let id = u32::try_from(token)
            .ok()
            .filter(|&id| (id as usize) < self.vocab_size)
            .ok_or(SamplerError::Token {
                token,
                vocab_size: self.vocab_size,
            })?;
        self.state.record(id);
        Ok(())
    }

    /// Chooses the next token (see the module documentation for the exact steps) and records it.
    /// On error nothing changes: the history and the random stream are as before.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sample, SamplerError> {
        if logits.len() != self.vocab_size {
            return Err(SamplerError::Length {
                expected: self.vocab_size,
                got: logits.len(),
            });
        }
        let raw = scan_raw(logits, self.top_logprobs, &mut self.scratch.top)?;
        let log_z = log_normalizer(logits, raw.max);

        let adjusted = !self.logit_bias.is_empty() || self.plan.penalised;
        let token = if self.plan.greedy && !adjusted {
            raw.argmax
        } else {
            self.fill_adjusted(logits);
            if self.plan.greedy {
                argmax(&self.scratch.values).ok_or(SamplerError::AllImpossible)?
            } else {
                self.draw()?
            }
        };

        self.state.record(token as u32);
        let logprob_of = |id: u32, logit: f32| (id, f64::from(logit) - log_z);
        let top_logprobs = self
            .scratch
            .top
            .iter()
            .map(|&(id, x)| logprob_of(id, x))
            .collect();
        Ok(Sample {
            token: token as u32,
            logprob: f64::from(logits[token]) - log_z,
            top_logprobs,
        })
    }

    /// Steps 2 and 3: `scratch.values` = logits + bias - penalties.
    fn fill_adjusted(&mut self, logits: &[f32]) {
        let values = &mut self.scratch.values;
        values.clear();
        values.extend(logits.iter().map(|&x| f64::from(x)));
        // Ids were checked against the vocabulary size, which is `logits.len()`.
        for &(id, bias) in &self.logit_bias {
            values[id as usize] += bias;
        }
        if self.plan.penalised {
            for (&id, &count) in &self.state.counts {
                values[id as usize] -=
                    self.frequency_penalty * f64::from(count) + self.presence_penalty;
            }
        }
    }

    /// Steps 4 to 6 on `scratch.values`, for a temperature that is not greedy.
    fn draw(&mut self) -> Result<usize, SamplerError> {
        let Scratch { values, order, .. } = &mut self.scratch;
        let mut max = f64::NEG_INFINITY;
        for v in values.iter_mut() {
            *v /= self.temperature;
            max = max.max(*v);
        }
        if max == f64::NEG_INFINITY {
            return Err(SamplerError::AllImpossible);
        }
        let mut total = 0.0;
        for v in values.iter_mut() {
            *v = (*v - max).exp();
            total += *v;
        }
        let weights: &[f64] = values;
        let u = self.rng.next_uniform();
        let chosen = if self.plan.nucleus {
            let kept = nucleus(weights, total, self.top_p, order);
            draw_in_id_order(weights, kept.iter().map(|&id| id as usize), u)
        } else {
            draw_in_id_order(weights, 0..weights.len(), u)
        };
        // The token of the maximum has weight exactly 1, so some token is always chosen.
        chosen.ok_or(SamplerError::AllImpossible)
    }
}

/// What the raw scan learned; the top logprob candidates are left in the scratch buffer.
struct RawScan {
    max: f32,
    argmax: usize,
}

/// Step 1. `top` receives the `k` best `(id, logit)` pairs, best first, ties by lower id.
fn scan_raw(logits: &[f32], k: usize, top: &mut Vec<(u32, f32)>) -> Result<RawScan, SamplerError> {
    top.clear();
    let mut max = f32::NEG_INFINITY;
    let mut argmax = 0;
    for (j, &x) in logits.iter().enumerate() {
        if x.is_nan() || x == f32::INFINITY {
            return Err(SamplerError::NonFiniteLogit { token: j, value: x });
        }
        // Strictly greater: the lowest id wins a tie.
        if x > max {
            max = x;
            argmax = j;
        }
        if k > 0 {
            offer_top(top, k, j as u32, x);
        }
    }
    if max == f32::NEG_INFINITY {
        return Err(SamplerError::AllImpossible);
    }
    Ok(RawScan { max, argmax })
}

/// Keeps `top` as the `k` best pairs seen so far. Ids arrive in increasing order, so a newcomer
/// that ties the worst kept value loses, and one that ties others goes after them.
fn offer_top(top: &mut Vec<(u32, f32)>, k: usize, id: u32, x: f32) {
    if top.len() == k {
        match top.last() {
            Some(&(_, worst)) if x > worst => {
                top.pop();
            }
            _ => return,
        }
    }
    let at = top.iter().position(|&(_, y)| y < x).unwrap_or(top.len());
    top.insert(at, (id, x));
}

/// `log(sum(exp(logits)))`, shifted by the maximum so that no term overflows; summed in id order.
fn log_normalizer(logits: &[f32], max: f32) -> f64 {
    let max = f64::from(max);
    let sum = logits
        .iter()
        .fold(0.0, |acc, &x| acc + (f64::from(x) - max).exp());
    max + sum.ln()
}

/// The first index of the maximum, or `None` when every value is -inf.
fn argmax(values: &[f64]) -> Option<usize> {
    let mut best = None;
    let mut max = f64::NEG_INFINITY;
    for (j, &v) in values.iter().enumerate() {
        if v > max {
            max = v;
            best = Some(j);
        }
    }
    best
}

/// Step 5. Leaves the kept ids, in increasing order, at the front of `order` and returns them.
fn nucleus<'a>(weights: &[f64], total: f64, top_p: f64, order: &'a mut Vec<u32>) -> &'a [u32] {
    order.clear();
    order.extend((0..weights.len() as u32).filter(|&id| weights[id as usize] > 0.0));
    let heavier_first = |a: &u32, b: &u32| -> Ordering {
        weights[*b as usize]
            .total_cmp(&weights[*a as usize])
            .then(a.cmp(b))
    };
    let threshold = top_p * total;
    let mut kept = order.len();
    let mut sorted = 0;
    let mut chunk = FIRST_NUCLEUS_CHUNK;
    let mut mass = 0.0;
    'chunks: while sorted < order.len() {
        let rest = &mut order[sorted..];
        let take = chunk.min(rest.len());
        if take < rest.len() {
            rest.select_nth_unstable_by(take - 1, heavier_first);
        }
        rest[..take].sort_unstable_by(heavier_first);
        for (i, &id) in rest[..take].iter().enumerate() {
            mass += weights[id as usize];
            if mass >= threshold {
                kept = sorted + i + 1;
                break 'chunks;
            }
        }
        sorted += take;
        chunk *= 2;
    }
    let kept = &mut order[..kept];
    kept.sort_unstable();
    kept
}

/// Step 6: inverse transform sampling over `ids` (increasing), `u` in `[0, 1)`.
fn draw_in_id_order<I>(weights: &[f64], ids: I, u: f64) -> Option<usize>
where
    I: Iterator<Item = usize> + Clone,
{
    let total = ids.clone().fold(0.0, |acc, j| acc + weights[j]);
    let target = u * total;
    let mut mass = 0.0;
    let mut last_possible = None;
    for j in ids {
        let w = weights[j];
        if w > 0.0 {
            mass += w;
            last_possible = Some(j);
            if mass > target {
                return Some(j);
            }
        }
    }
    // Only reached when `u * total` rounded up to `total`.
    last_possible
}

#[cfg(test)]
mod tests;
