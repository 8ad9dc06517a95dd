//! One sampling step of one row, stage by stage, in the order listed in `sampler.rs`.
//!
//! Nothing here runs per token over the vocabulary except three vectorised passes: the raw scan
//! (block maxima), the fast f32 weight sums, and, with logprobs, the normaliser. Bias and penalties
//! touch only their own tokens; top-p and top logprobs look only at the blocks whose maximum can
//! matter. Where a fast f32 sum could decide a draw differently from exact arithmetic (the draw
//! lands within the sum's error bound of a boundary), the decision is redone with exact f64 sums.

use std::cmp::Ordering;

use crate::error::SamplerError;
use crate::kernels::{FastShift, FastSum, Kernels, BLOCK};
use crate::rng::SequenceRng;
use crate::sampler::{Params, SequenceState};

/// Top-p looks first at tokens within `e^LEVEL` of the heaviest, widening while they do not reach
/// `top_p` of the mass. Any level whose candidates reach the threshold gives the same crossing, so
/// the first level only trades the cost of one collection against that of a second: with
/// penalties over a long history the nucleus of real logits reaches `e^-5` to `e^-7`, so starting
/// at `e^-4` nearly always collected, weighed and sorted a few hundred candidates for nothing, while
/// a peaked row costs only a few dozen more candidates at `e^-8`.
const NUCLEUS_LEVELS: [f64; 5] = [-8.0, -16.0, -32.0, -64.0, f64::NEG_INFINITY];

/// Candidates of top-p are sorted, heaviest first, in chunks of this size, doubling each time, so
/// that a peaked distribution (the usual case) sorts a few dozen tokens.
const FIRST_NUCLEUS_CHUNK: usize = 64;

/// A token whose value bias, penalties or a mask changed; its weight is computed apart, exactly.
#[derive(Debug, Clone, Copy)]
struct Touched {
    id: u32,
    /// The raw logit, kept so that later stages need not read the row at a scattered id again.
    logit: f32,
    /// `(logit + bias) - penalty`, or `-inf` when the mask forbids it. Set by the scan, which reads
    /// the logit while the block is in L1 (800 scattered reads of a row not yet in cache would cost
    /// more than the rest of a step).
    value: f64,
    /// 0 when the token has no bias (adding 0 changes no value that matters).
    bias: f64,
    /// `frequency_penalty * count + presence_penalty`, 0 when the token is not in the history.
    penalty: f64,
    allowed: bool,
    weight: f64,
}

impl Touched {
    fn read(&mut self, logit: f32) {
        self.logit = logit;
        self.value = if self.allowed {
            (f64::from(logit) + self.bias) - self.penalty
        } else {
            f64::NEG_INFINITY
        };
    }
}

/// Buffers kept between steps, so that a step allocates nothing once they have grown.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    raw_max: Vec<f32>,
    effective_max: Vec<f32>,
    /// Fast weight sums of each block, relative to its effective maximum until `draw` scales them.
    fast_sums: Vec<FastSum>,
    /// Fast sums of `exp(x - raw block maximum)`, for the logprobs' normaliser.
    normaliser_sums: Vec<f64>,
    factors: Vec<f64>,
    /// Fast block sums plus the touched weights of the block.
    block_totals: Vec<f64>,
    exact_sums: Vec<f64>,
    touched: Vec<Touched>,
    /// Top-p's candidates `(id, exact weight)`, in id order.
    candidates: Vec<(u32, f64)>,
    /// Room for reordered candidates (the merge of touched tokens, a full sort when needed).
    sorted: Vec<(u32, f64)>,
    /// The candidates of the histogram bucket where top-p's running mass crosses its threshold.
    crossing_bucket: Vec<(u32, f64)>,
    patch: Vec<f32>,
    /// The row with the mask applied (forbidden tokens at `-inf`), when there is a mask.
    masked: Vec<f32>,
    weights: Vec<f64>,
    top: Vec<(u32, f32)>,
    /// The top logprobs of the last step, `(token, raw logprob)`, most likely first.
    pub top_logprobs: Vec<(u32, f64)>,
}

/// The outcome of a step, not yet applied to the sequence (see [`crate::sampler::Sequence::commit`]).
#[derive(Debug, Clone)]
pub struct Pending {
    pub token: u32,
    /// Raw logprob of the token; NaN when the sequence asked for no logprobs.
    pub logprob: f64,
    /// The random stream after the draw; `None` when nothing was drawn (greedy).
    pub rng: Option<SequenceRng>,
}

/// Number of `u32` words in a row of the allowed-token bitmask.
pub fn mask_words(vocab_size: usize) -> usize {
    vocab_size.div_ceil(32)
}

/// The whole step. On error the sequence is untouched (nothing here mutates it).
pub fn choose(
    params: &Params,
    state: &SequenceState,
    rng: &SequenceRng,
    logits: &[f32],
    mask: Option<&[u32]>,
    scratch: &mut Scratch,
) -> Result<Pending, SamplerError> {
    let k = Kernels::get();
    let vocab = params.vocab_size;
    if logits.len() != vocab {
        return Err(SamplerError::Length {
            expected: vocab,
            got: logits.len(),
        });
    }
    if let Some(mask) = mask {
        if mask.len() != mask_words(vocab) {
            return Err(SamplerError::MaskLength {
                expected: mask_words(vocab),
                got: mask.len(),
            });
        }
    }
    scratch.patch.resize(BLOCK, 0.0);
    scratch.weights.resize(BLOCK, 0.0);

    // 3.-5. Mask, bias and penalties, only on the tokens they touch (found first, so that the scan
    // below can weigh each block while it is in L1).
    let wants_logprobs = params.logprobs || params.top_logprobs > 0;
    let mask = mask.filter(|m| !allows_everything(m, vocab));
    fill_touched(params, state, mask, &mut scratch.touched);
    let raw_greedy = params.greedy && scratch.touched.is_empty() && mask.is_none();

    // With a mask, the later passes read the masked row, built once.
    let mut masked = std::mem::take(&mut scratch.masked);
    let base = match mask {
        Some(mask) => {
            masked.resize(logits.len(), 0.0);
            (k.apply_mask)(logits, mask, &mut masked);
            &masked[..]
        }
        None => logits,
    };

    // 1. The one pass over the row (and the fast weights and normaliser sums of each block).
    let pass = Pass {
        effective: !raw_greedy,
        masked: mask.is_some(),
        weigh: (!params.greedy).then(|| (1.0 / params.temperature) as f32),
        normalise: wants_logprobs,
    };
    let scanned = scan(logits, base, pass, scratch, k);
    let result = scanned.and_then(|max| {
        // 2. Logprobs, of the raw logits.
        let log_z = if wants_logprobs {
            fast_log_normalizer(scratch, max, k)
        } else {
            f64::NAN
        };
        top_raw(
            logits,
            &scratch.raw_max,
            params.top_logprobs.min(vocab),
            &mut scratch.top,
        );
        scratch.top_logprobs.clear();
        scratch.top_logprobs.extend(
            scratch
                .top
                .iter()
                .map(|&(id, x)| (id, f64::from(x) - log_z)),
        );
        let chosen = if raw_greedy {
            Ok((raw_argmax(logits, &scratch.raw_max, max), None))
        } else {
            choose_adjusted(params, base, mask.is_some(), scratch, rng, k)
        };
        chosen.map(|(token, rng)| (token, rng, log_z))
    });
    scratch.masked = masked;
    let (token, rng, log_z) = result?;
    let logprob = if wants_logprobs {
        f64::from(logits[token as usize]) - log_z
    } else {
        f64::NAN
    };
    Ok(Pending {
        token,
        logprob,
        rng,
    })
}

/// Steps 6 to 8 on `base`, the row with masked tokens at `-inf`.
fn choose_adjusted(
    params: &Params,
    base: &[f32],
    masked: bool,
    scratch: &mut Scratch,
    rng: &SequenceRng,
    k: &Kernels,
) -> Result<(u32, Option<SequenceRng>), SamplerError> {
    let untouched_max = scratch
        .effective_max
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if params.greedy {
        Ok((greedy(base, masked, scratch, untouched_max)?, None))
    } else {
        let mut rng = rng.clone();
        let token = draw(params, base, masked, scratch, untouched_max, &mut rng, k)?;
        Ok((token, Some(rng)))
    }
}

/// What the scan works out of each block besides its raw maximum, while the block is in L1.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// The block's effective maximum: its untouched, allowed tokens only.
    effective: bool,
    /// Whether `base` has masked tokens at `-inf`.
    masked: bool,
    /// The fast weights of the effective block at this inverse temperature, relative to the
    /// block's effective maximum (scaled to the row's maximum once that is known).
    weigh: Option<f32>,
    /// The fast sum of `exp(x - raw block maximum)`, for the normaliser of the logprobs.
    normalise: bool,
}

/// What the scan writes for a run of blocks starting at block `first`.
struct ScanChunk<'a> {
    first: usize,
    raw_max: &'a mut [f32],
    effective_max: &'a mut [f32],
    fast_sums: &'a mut [FastSum],
    normaliser_sums: &'a mut [f64],
    /// The touched tokens of these blocks.
    touched: &'a mut [Touched],
}

/// Step 1: block maxima of the raw logits and whatever else `pass` asks of each block; refuses NaN,
/// +inf and an all `-inf` row. One read of the row: every other pass over a block runs while the
/// block is still in L1.
fn scan(
    logits: &[f32],
    base: &[f32],
    pass: Pass,
    scratch: &mut Scratch,
    k: &Kernels,
) -> Result<f32, SamplerError> {
    let blocks = logits.len().div_ceil(BLOCK);
    let Scratch {
        raw_max,
        effective_max,
        fast_sums,
        normaliser_sums,
        touched,
        patch,
        ..
    } = scratch;
    raw_max.resize(blocks, f32::NEG_INFINITY);
    effective_max.resize(blocks, f32::NEG_INFINITY);
    fast_sums.resize(blocks, FastSum::default());
    normaliser_sums.resize(blocks, 0.0);
    let whole = ScanChunk {
        first: 0,
        raw_max,
        effective_max,
        fast_sums,
        normaliser_sums,
        touched,
    };
    let bad = scan_chunk(whole, logits, base, pass, patch, k);
    if bad {
        // Rare: find the first offender for the message.
        if let Some((token, &value)) = logits
            .iter()
            .enumerate()
            .find(|(_, &x)| x.is_nan() || x == f32::INFINITY)
        {
            return Err(SamplerError::NonFiniteLogit { token, value });
        }
    }
    let max = raw_max
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if max == f32::NEG_INFINITY {
        return Err(SamplerError::AllImpossible);
    }
    Ok(max)
}

/// The scan of one run of blocks; returns whether any held NaN or +inf.
fn scan_chunk(
    chunk: ScanChunk<'_>,
    logits: &[f32],
    base: &[f32],
    pass: Pass,
    patch: &mut [f32],
    k: &Kernels,
) -> bool {
    let ScanChunk {
        first,
        raw_max,
        effective_max,
        fast_sums,
        normaliser_sums,
        touched,
    } = chunk;
    let mut bad = false;
    let mut cursor = 0;
    for i in 0..raw_max.len() {
        let b = first + i;
        let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(logits.len()));
        let block = &logits[lo..hi];
        let (raw, is_bad) = (k.max_and_bad)(block);
        raw_max[i] = raw;
        bad |= is_bad;
        if pass.normalise {
            normaliser_sums[i] = if raw == f32::NEG_INFINITY {
                0.0
            } else {
                let shift = FastShift {
                    reference: raw,
                    scale: 1.0,
                    offset: 0.0,
                };
                (k.fast_exp_sum)(block, shift).sum
            };
        }
        if !pass.effective {
            continue;
        }
        let start = cursor;
        let count = touched_before(touched, &mut cursor, hi).len();
        let in_block = &mut touched[start..start + count];
        for t in in_block.iter_mut() {
            t.read(block[t.id as usize - lo]);
        }
        let in_block = &*in_block;
        // Without a mask the raw maximum stands unless a touched token holds it: bias and
        // penalties touch about half the blocks, seldom their maximum.
        let keeps_raw = !pass.masked && in_block.iter().all(|t| t.logit != raw);
        let effective_block = if keeps_raw && pass.weigh.is_none() {
            &[][..]
        } else {
            effective_block(base, b, in_block, patch)
        };
        let effective = if keeps_raw {
            raw
        } else {
            (k.max_and_bad)(effective_block).0
        };
        effective_max[i] = effective;
        if let Some(scale) = pass.weigh {
            fast_sums[i] = if effective == f32::NEG_INFINITY {
                FastSum::default()
            } else {
                let shift = FastShift {
                    reference: effective,
                    scale,
                    offset: 0.0,
                };
                (k.fast_exp_sum)(effective_block, shift)
            };
        }
    }
    bad
}

/// Step 2 from the scan's fast block sums (each relative to its block's maximum), within ~1e-6.
fn fast_log_normalizer(scratch: &mut Scratch, max: f32, k: &Kernels) -> f64 {
    let Scratch {
        raw_max,
        normaliser_sums,
        factors,
        ..
    } = scratch;
    block_factors(raw_max, 1.0, f64::from(max), factors, k);
    let sum: f64 = normaliser_sums
        .iter()
        .zip(factors.iter())
        .map(|(s, f)| s * f)
        .sum();
    f64::from(max) + sum.ln()
}

/// `factors[b] = exp(maxima[b] * scale - shift)`, 0 for a block at `-inf`: what turns a block's fast
/// sum, taken relative to its own maximum, into the row's units.
fn block_factors(maxima: &[f32], scale: f64, shift: f64, factors: &mut Vec<f64>, k: &Kernels) {
    factors.clear();
    factors.extend(maxima.iter().map(|&m| {
        if m == f32::NEG_INFINITY {
            f64::NEG_INFINITY
        } else {
            f64::from(m) * scale - shift
        }
    }));
    (k.exp_in_place)(factors);
}

/// The `k` best `(id, raw logit)` pairs, best first, ties by lower id. Only blocks whose maximum
/// reaches the `k`-th largest block maximum can hold one of them.
fn top_raw(logits: &[f32], raw_max: &[f32], k: usize, top: &mut Vec<(u32, f32)>) {
    top.clear();
    if k == 0 {
        return;
    }
    let threshold = if k >= raw_max.len() {
        f32::NEG_INFINITY
    } else {
        let mut maxima = raw_max.to_vec();
        let (_, kth, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *kth
    };
    for (b, &block_max) in raw_max.iter().enumerate() {
        if block_max >= threshold {
            let lo = b * BLOCK;
            for (i, &x) in logits[lo..(lo + BLOCK).min(logits.len())]
                .iter()
                .enumerate()
            {
                offer_top(top, k, (lo + i) as u32, x);
            }
        }
    }
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

fn raw_argmax(logits: &[f32], raw_max: &[f32], max: f32) -> u32 {
    // The scan found `max` in some block, so both searches succeed; the fallbacks are unreachable.
    let b = raw_max.iter().position(|&m| m == max).unwrap_or(0);
    let lo = b * BLOCK;
    let i = logits[lo..].iter().position(|&x| x == max).unwrap_or(0);
    (lo + i) as u32
}

fn is_allowed(mask: &[u32], id: usize) -> bool {
    (mask[id / 32] >> (id % 32)) & 1 == 1
}

/// Whether the mask allows every token of `lo..hi` (`lo` a multiple of 32).
fn allows_range(mask: &[u32], lo: usize, hi: usize) -> bool {
    let (first, full_end) = (lo / 32, hi / 32);
    if mask[first..full_end].iter().any(|&w| w != u32::MAX) {
        return false;
    }
    let rest = hi % 32;
    rest == 0 || mask[full_end] & ((1u32 << rest) - 1) == (1u32 << rest) - 1
}

fn allows_everything(mask: &[u32], vocab: usize) -> bool {
    allows_range(mask, 0, vocab)
}

/// Steps 3 to 5 for the tokens they touch: their bias and penalty (the scan then sets
/// `value = (logit + bias) - penalty`, the order and arithmetic of the first sampler), and whether
/// the mask allows them.
fn fill_touched(
    params: &Params,
    state: &SequenceState,
    mask: Option<&[u32]>,
    touched: &mut Vec<Touched>,
) {
    touched.clear();
    let counts: &[(u32, u32)] = if params.penalised {
        state.counts()
    } else {
        &[]
    };
    let bias = &params.logit_bias[..];
    let (mut i, mut j) = (0, 0);
    while i < bias.len() || j < counts.len() {
        let id = match (bias.get(i), counts.get(j)) {
            (Some(&(a, _)), Some(&(b, _))) => a.min(b),
            (Some(&(a, _)), None) => a,
            (None, Some(&(b, _))) => b,
            (None, None) => break,
        };
        let mut t = Touched {
            id,
            logit: f32::NAN,
            value: f64::NAN,
            bias: 0.0,
            penalty: 0.0,
            allowed: mask.is_none_or(|m| is_allowed(m, id as usize)),
            weight: 0.0,
        };
        if let Some(&(_, b)) = bias.get(i).filter(|&&(a, _)| a == id) {
            t.bias = b;
            i += 1;
        }
        if let Some(&(_, c)) = counts.get(j).filter(|&&(a, _)| a == id) {
            t.penalty = params.frequency_penalty * f64::from(c) + params.presence_penalty;
            j += 1;
        }
        touched.push(t);
    }
}

/// The touched tokens of `..hi` from `cursor` on (they are sorted by id).
fn touched_before<'a>(touched: &'a [Touched], cursor: &mut usize, hi: usize) -> &'a [Touched] {
    let start = *cursor;
    while *cursor < touched.len() && (touched[*cursor].id as usize) < hi {
        *cursor += 1;
    }
    &touched[start..*cursor]
}

/// A block as the later stages see it: touched tokens set to `-inf` (their weights are handled
/// apart). Copies into `patch` only when the block has touched tokens.
fn effective_block<'a>(
    base: &'a [f32],
    b: usize,
    touched: &[Touched],
    patch: &'a mut [f32],
) -> &'a [f32] {
    let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(base.len()));
    let block = &base[lo..hi];
    if touched.is_empty() {
        return block;
    }
    let patch = &mut patch[..block.len()];
    patch.copy_from_slice(block);
    for t in touched {
        patch[t.id as usize - lo] = f32::NEG_INFINITY;
    }
    patch
}

fn nothing_allowed(masked: bool) -> SamplerError {
    if masked {
        SamplerError::NothingAllowed
    } else {
        SamplerError::AllImpossible
    }
}

/// Step 6, greedy: the highest value, ties to the lowest id.
fn greedy(
    logits: &[f32],
    masked: bool,
    scratch: &mut Scratch,
    untouched_max: f32,
) -> Result<u32, SamplerError> {
    let mut best: Option<(f64, u32)> = None;
    if untouched_max > f32::NEG_INFINITY {
        let b = scratch
            .effective_max
            .iter()
            .position(|&m| m == untouched_max)
            .unwrap_or(0);
        let mut cursor = scratch
            .touched
            .partition_point(|t| (t.id as usize) < b * BLOCK);
        let hi = ((b + 1) * BLOCK).min(logits.len());
        let in_block = touched_before(&scratch.touched, &mut cursor, hi);
        let block = effective_block(logits, b, in_block, &mut scratch.patch);
        let i = block.iter().position(|&x| x == untouched_max).unwrap_or(0);
        best = Some((f64::from(untouched_max), (b * BLOCK + i) as u32));
    }
    for t in &scratch.touched {
        let better = match best {
            None => true,
            Some((v, id)) => t.value > v || (t.value == v && t.id < id),
        };
        if better {
            best = Some((t.value, t.id));
        }
    }
    match best {
        Some((v, id)) if v > f64::NEG_INFINITY => Ok(id),
        _ => Err(nothing_allowed(masked)),
    }
}

/// Steps 6 to 8 for a temperature that is not greedy.
fn draw(
    params: &Params,
    logits: &[f32],
    masked: bool,
    scratch: &mut Scratch,
    untouched_max: f32,
    rng: &mut SequenceRng,
    k: &Kernels,
) -> Result<u32, SamplerError> {
    let inv_t = 1.0 / params.temperature;
    let mut m = f64::from(untouched_max) * inv_t;
    for t in &scratch.touched {
        m = m.max(t.value * inv_t);
    }
    if m == f64::NEG_INFINITY {
        return Err(nothing_allowed(masked));
    }
    // All touched weights in one call of the block kernel (the same arithmetic as `k.exp`, one
    // indirect call instead of one per token).
    {
        let Scratch {
            touched, weights, ..
        } = scratch;
        weights.clear();
        weights.extend(touched.iter().map(|t| t.value * inv_t - m));
        (k.exp_in_place)(weights);
        for (t, &w) in touched.iter_mut().zip(weights.iter()) {
            t.weight = w;
        }
        weights.resize(BLOCK, 0.0);
    }
    let touched_total: f64 = scratch.touched.iter().map(|t| t.weight).sum();

    // The scan's fast sums are each relative to their block's effective maximum `e`: scaled by
    // `exp(e * inv_t - m)` (f64) they are in the units of the exact weights `exp(x * inv_t - m)`.
    let mut fast = FastSum::default();
    {
        let Scratch {
            effective_max,
            fast_sums,
            factors,
            ..
        } = scratch;
        block_factors(effective_max, inv_t, m, factors, k);
        for (sum, &factor) in fast_sums.iter_mut().zip(factors.iter()) {
            *sum = FastSum {
                sum: sum.sum * factor,
                sum_wt: sum.sum_wt * factor,
            };
            fast = fast + *sum;
        }
    }
    // Each block's `z` is relative to its own maximum, so the f32 part has no offset; the factor's
    // f64 argument is within about `|m| 2^-52` and stands in for it. Not finite only for absurd
    // inputs (logits near f32::MAX): then every decision goes exact.
    let offset = (m.abs() * f64::powi(2.0, -30)) as f32;
    let bound = Some(fast.error_bound(offset, logits.len()))
        .filter(|b| b.is_finite())
        .unwrap_or(f64::INFINITY);
    let total = fast.sum + touched_total;
    let u = rng.next_uniform();

    let row = Row {
        logits,
        inv_t,
        m,
        k,
    };
    if params.nucleus {
        Ok(row.nucleus_draw(scratch, params.top_p, total, bound, u))
    } else {
        Ok(row.full_draw(scratch, total, bound, u))
    }
}

/// What the weight stages need to know about the row.
struct Row<'a> {
    /// The row with masked tokens at `-inf`.
    logits: &'a [f32],
    inv_t: f64,
    m: f64,
    k: &'a Kernels,
}

impl Row<'_> {
    fn blocks(&self) -> usize {
        self.logits.len().div_ceil(BLOCK)
    }

    /// Exact weights of block `b` into `scratch.weights`, touched tokens at their own weights.
    fn exact_block_weights(&self, scratch: &mut Scratch, b: usize, cursor: &mut usize) -> usize {
        let Scratch {
            touched,
            patch,
            weights,
            ..
        } = scratch;
        let hi = ((b + 1) * BLOCK).min(self.logits.len());
        let in_block = touched_before(touched, cursor, hi);
        let block = effective_block(self.logits, b, in_block, patch);
        let len = block.len();
        (self.k.exp_into)(block, self.inv_t, self.m, &mut weights[..len]);
        for t in in_block {
            weights[t.id as usize - b * BLOCK] = t.weight;
        }
        len
    }

    /// The exact total weight: all exponentials in f64 (the fallback when the fast total is too
    /// uncertain to decide).
    fn exact_sums(&self, scratch: &mut Scratch) -> f64 {
        let mut cursor = 0;
        let mut total = 0.0;
        scratch.exact_sums.clear();
        for b in 0..self.blocks() {
            let hi = ((b + 1) * BLOCK).min(self.logits.len());
            let in_block = touched_before(&scratch.touched, &mut cursor, hi);
            let mut sum = if scratch.effective_max[b] == f32::NEG_INFINITY {
                0.0
            } else {
                let block = effective_block(self.logits, b, in_block, &mut scratch.patch);
                (self.k.exp_sum)(block, self.inv_t, self.m)
            };
            sum += in_block.iter().map(|t| t.weight).sum::<f64>();
            scratch.exact_sums.push(sum);
            total += sum;
        }
        total
    }

    /// Step 7 and 8 with top-p: candidates are the tokens above a weight level, widened until
    /// their mass reaches `top_p` of the total.
    fn nucleus_draw(
        &self,
        scratch: &mut Scratch,
        top_p: f64,
        total: f64,
        bound: f64,
        u: f64,
    ) -> u32 {
        let mut thresholds = (top_p * (total - bound), top_p * (total + bound));
        let mut kept = None;
        for level in NUCLEUS_LEVELS {
            self.collect_candidates(scratch, level);
            let Scratch {
                candidates,
                sorted,
                crossing_bucket,
                ..
            } = &mut *scratch;
            let (lo, hi) = crossing_keys(candidates, thresholds, sorted, crossing_bucket);
            match (lo, hi) {
                (Some(a), Some(b)) if a == b => {
                    kept = Some(a);
                    break;
                }
                (Some(_), _) if thresholds.0 != thresholds.1 => {
                    // The fast total cannot decide: settle it with exact sums.
                    let exact = top_p * self.exact_sums(scratch);
                    thresholds = (exact, exact);
                    let Scratch {
                        candidates,
                        sorted,
                        crossing_bucket,
                        ..
                    } = &mut *scratch;
                    if let (Some(a), _) =
                        crossing_keys(candidates, thresholds, sorted, crossing_bucket)
                    {
                        kept = Some(a);
                        break;
                    }
                }
                _ => {}
            }
        }
        // The kept tokens in id order (the candidates' order). With no crossing (never reached)
        // every token with a positive weight is kept, as the first sampler did.
        let is_kept = |&(id, w): &(u32, f64)| kept.is_none_or(|c: Crossing| c.keeps(id, w));
        let candidates = &scratch.candidates;
        let kept_total = candidates
            .iter()
            .filter(|c| is_kept(c))
            .fold(0.0, |acc, &(_, w)| acc + w);
        let target = u * kept_total;
        let mut mass = 0.0;
        let mut last = 0;
        for &(id, w) in candidates.iter().filter(|c| is_kept(c)) {
            mass += w;
            if mass > target {
                return id;
            }
            last = id;
        }
        // Only reached when `u * kept_total` rounded up to it.
        last
    }

    /// Tokens with weight at least `e^level` (all with a positive weight at `-inf`). Logits are
    /// compared in f32 against a cut a little below the level, and only those above it get an
    /// exact weight.
    fn collect_candidates(&self, scratch: &mut Scratch, level: f64) {
        let floor = level.exp();
        // z >= level  <=>  x >= (level + m) / inv_t; the slack keeps every token the exact test keeps.
        let cut = ((level + self.m) / self.inv_t) as f32;
        let cut = if level == f64::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            cut - cut.abs() * 1e-5 - 1e-5
        };
        let Scratch {
            effective_max,
            touched,
            candidates,
            weights,
            sorted,
            ..
        } = scratch;
        candidates.clear();
        let mut cursor = 0;
        // One bit per token of a block: vector compares find the few tokens above the cut, and a
        // touched token is dropped by clearing its bit (its weight is added apart below), so the
        // block is read in place instead of copied into a patch.
        let mut above = [0u32; BLOCK / 32];
        for (b, &block_max) in effective_max.iter().enumerate() {
            let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(self.logits.len()));
            let in_block = touched_before(touched, &mut cursor, hi);
            if block_max == f32::NEG_INFINITY || block_max < cut {
                continue;
            }
            let block = &self.logits[lo..hi];
            let words = &mut above[..block.len().div_ceil(32)];
            (self.k.above_mask)(block, cut, words);
            for t in in_block {
                let i = t.id as usize - lo;
                words[i / 32] &= !(1 << (i % 32));
            }
            for (w, &word) in words.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let i = w * 32 + word.trailing_zeros() as usize;
                    word &= word - 1;
                    candidates.push(((lo + i) as u32, f64::from(block[i])));
                }
            }
        }
        // Exact weights, in place, then the exact test.
        weights.clear();
        weights.extend(candidates.iter().map(|&(_, x)| x * self.inv_t - self.m));
        (self.k.exp_in_place)(weights);
        let mut kept = 0;
        for i in 0..candidates.len() {
            if weights[i] > 0.0 && weights[i] >= floor {
                candidates[kept] = (candidates[i].0, weights[i]);
                kept += 1;
            }
        }
        candidates.truncate(kept);
        weights.resize(BLOCK, 0.0);
        // Touched tokens merged in, so that the candidates stay in id order.
        if touched.iter().any(|t| t.weight > 0.0 && t.weight >= floor) {
            sorted.clear();
            let mut extra = touched
                .iter()
                .filter(|t| t.weight > 0.0 && t.weight >= floor)
                .map(|t| (t.id, t.weight))
                .peekable();
            for &c in candidates.iter() {
                while let Some(t) = extra.next_if(|t| t.0 < c.0) {
                    sorted.push(t);
                }
                sorted.push(c);
            }
            sorted.extend(extra);
            std::mem::swap(candidates, sorted);
        }
    }

    /// Step 8 without top-p: the first token, in id order, whose running weight exceeds
    /// `u * total`. Blocks are skipped by their fast sums; the result is accepted only if no
    /// boundary lies within the sums' error bound of the target, else redone exactly.
    fn full_draw(&self, scratch: &mut Scratch, total: f64, bound: f64, u: f64) -> u32 {
        let mut fast = std::mem::take(&mut scratch.block_totals);
        fast.clear();
        let mut cursor = 0;
        for (b, s) in scratch.fast_sums.iter().enumerate() {
            let hi = ((b + 1) * BLOCK).min(self.logits.len());
            let in_block = touched_before(&scratch.touched, &mut cursor, hi);
            fast.push(s.sum + in_block.iter().map(|t| t.weight).sum::<f64>());
        }
        let fast_walk = self.walk(scratch, &fast, u * total, false);
        scratch.block_totals = fast;
        if let Some((token, before, after)) = fast_walk {
            let target = u * total;
            // Both the prefix and the target can be off by `bound`.
            if target - before > 2.0 * bound && after - target > 2.0 * bound {
                return token;
            }
        }
        let exact_total = self.exact_sums(scratch);
        let sums = std::mem::take(&mut scratch.exact_sums);
        let result = self.walk(scratch, &sums, u * exact_total, true);
        scratch.exact_sums = sums;
        result.map_or(0, |(token, _, _)| token)
    }

    /// Walks the blocks by `sums`, then the tokens of the block where the running sum passes
    /// `target`. Returns the token and the running sums just before and after it. With `to_end`
    /// it goes on past a block whose tokens did not reach the target (sums rounded differently)
    /// and ends on the last possible token, as the first sampler did.
    fn walk(
        &self,
        scratch: &mut Scratch,
        sums: &[f64],
        target: f64,
        to_end: bool,
    ) -> Option<(u32, f64, f64)> {
        let mut mass = 0.0;
        let mut last_possible = None;
        let mut b = 0;
        while b < sums.len() {
            if mass + sums[b] <= target && b + 1 < sums.len() {
                mass += sums[b];
                b += 1;
                continue;
            }
            let mut cursor = scratch
                .touched
                .partition_point(|t| (t.id as usize) < b * BLOCK);
            let len = self.exact_block_weights(scratch, b, &mut cursor);
            for (i, &w) in scratch.weights[..len].iter().enumerate() {
                if w > 0.0 {
                    let before = mass;
                    mass += w;
                    last_possible = Some(((b * BLOCK + i) as u32, before, mass));
                    if mass > target {
                        return last_possible;
                    }
                }
            }
            if !to_end {
                return None;
            }
            b += 1;
        }
        if !to_end {
            return None;
        }
        last_possible.or_else(|| self.last_positive(scratch, sums))
    }

    /// The last token with a positive weight (when the target rounded up to the total).
    fn last_positive(&self, scratch: &mut Scratch, sums: &[f64]) -> Option<(u32, f64, f64)> {
        let b = sums.iter().rposition(|&s| s > 0.0)?;
        let mut cursor = scratch
            .touched
            .partition_point(|t| (t.id as usize) < b * BLOCK);
        let len = self.exact_block_weights(scratch, b, &mut cursor);
        let i = scratch.weights[..len].iter().rposition(|&w| w > 0.0)?;
        Some(((b * BLOCK + i) as u32, 0.0, 0.0))
    }
}

/// Buckets of the weight histogram of [`crossing`]: eight per octave below 1, so 32 octaves
/// (down to about `e^-22`); lighter weights share the last bucket.
const WEIGHT_BUCKETS: usize = 256;

/// The histogram bucket of a weight `w >= 0`: its exponent and three leading mantissa bits, counted
/// down from 1. It never increases as `w` grows, so the candidates of buckets `0..=b` are exactly the
/// heaviest ones.
fn weight_bucket(w: f64) -> usize {
    const ONE: usize = (1.0f64.to_bits() >> 49) as usize;
    if w > 0.0 {
        ONE.saturating_sub((w.to_bits() >> 49) as usize)
            .min(WEIGHT_BUCKETS - 1)
    } else {
        WEIGHT_BUCKETS - 1
    }
}

/// Where top-p's heavier-first running mass first reaches a threshold: the number of candidates
/// kept and the last kept one. The kept tokens are exactly those at least as heavy, ties going
/// to the lower id.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Crossing {
    kept: usize,
    weight: f64,
    id: u32,
}

impl Crossing {
    fn keeps(&self, id: u32, weight: f64) -> bool {
        weight > self.weight || (weight == self.weight && id <= self.id)
    }
}

/// [`crossing`]'s answer for each threshold, without reordering `candidates`.
///
/// The histogram of [`weight_bucket`] says which bucket holds the crossing; only that bucket's
/// candidates are sorted, the heavier buckets' mass is taken as a sum in candidate order. That sum
/// differs from the heavier-first running sum of a full sort by rounding alone, at most
/// `2 n 2^-53` of it for `n` terms: where a threshold lies farther than that from the running
/// mass on both sides of the crossing, the answer is exactly the full sort's; otherwise (or if the
/// rounding moved the crossing out of the bucket) a full sort in `sorted` settles it.
fn crossing_keys(
    candidates: &[(u32, f64)],
    thresholds: (f64, f64),
    sorted: &mut Vec<(u32, f64)>,
    bucket: &mut Vec<(u32, f64)>,
) -> (Option<Crossing>, Option<Crossing>) {
    let mut mass = [0.0f64; WEIGHT_BUCKETS];
    let mut count = [0usize; WEIGHT_BUCKETS];
    for &(_, w) in candidates {
        let b = weight_bucket(w);
        mass[b] += w;
        count[b] += 1;
    }
    let total: f64 = mass.iter().sum();
    // As in `crossing`: far short of the lower threshold, no order of summing reaches it.
    if total < thresholds.0 * (1.0 - 1e-9) {
        return (None, None);
    }
    let mut find = |threshold: f64| -> Result<Option<Crossing>, ()> {
        let slack = |terms: usize, m: f64| 2.0 * (terms as f64 + 1.0) * f64::EPSILON * m;
        let (mut before, mut terms) = (0.0, 0);
        for b in 0..WEIGHT_BUCKETS {
            if before + mass[b] < threshold {
                before += mass[b];
                terms += count[b];
                continue;
            }
            bucket.clear();
            bucket.extend(candidates.iter().filter(|c| weight_bucket(c.1) == b));
            bucket.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut running = before;
            for (j, &(id, w)) in bucket.iter().enumerate() {
                let previous = running;
                running += w;
                if running >= threshold {
                    let clear = running - slack(terms + j + 1, running) >= threshold
                        && previous + slack(terms + j, previous) < threshold;
                    return if clear {
                        Ok(Some(Crossing {
                            kept: terms + j + 1,
                            weight: w,
                            id,
                        }))
                    } else {
                        Err(())
                    };
                }
            }
            return Err(());
        }
        // Not reached by the histogram's total: fine only if no order of summing could reach it.
        if before + slack(terms, before) < threshold {
            Ok(None)
        } else {
            Err(())
        }
    };
    let lo = find(thresholds.0);
    let hi = if thresholds.1 == thresholds.0 {
        lo
    } else {
        find(thresholds.1)
    };
    if let (Ok(lo), Ok(hi)) = (lo, hi) {
        return (lo, hi);
    }
    sorted.clear();
    sorted.extend_from_slice(candidates);
    let (lo, hi) = crossing(sorted, thresholds);
    let key = |i: usize| Crossing {
        kept: i + 1,
        weight: sorted[i].1,
        id: sorted[i].0,
    };
    (lo.map(key), hi.map(key))
}

/// Sorts `candidates` heaviest first (ties: lower id) as far as needed and returns the first
/// index where the running mass reaches each threshold (`None` where it never does). Weights are
/// `>= 0` (exact exponentials).
///
/// A histogram of the weights by [`weight_bucket`] says which buckets hold the crossing, so one
/// pass moves the candidates of those buckets to the front and only they are sorted; sorting
/// in doubling chunks, each selected out of the rest, carries on from there should the running
/// mass (summed in another order than the histogram's) fall just short. The running mass is summed
/// in sorted order as before, so the indices are exactly those of a full sort.
fn crossing(candidates: &mut [(u32, f64)], (lo, hi): (f64, f64)) -> (Option<usize>, Option<usize>) {
    let heavier_first =
        |a: &(u32, f64), b: &(u32, f64)| -> Ordering { b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)) };
    let mut histogram = [0.0f64; WEIGHT_BUCKETS];
    for &(_, w) in candidates.iter() {
        debug_assert!(w >= 0.0, "weight {w}");
        histogram[weight_bucket(w)] += w;
    }
    let total: f64 = histogram.iter().sum();
    // The running mass is the same sum in another order, within n * 2^-53 of it relatively
    // (n <= 2^18): far short of `lo` means the running mass cannot reach it either.
    if total < lo * (1.0 - 1e-9) {
        return (None, None);
    }
    let want = if total >= hi { hi } else { lo };
    let mut cumulative = 0.0;
    let last = histogram
        .iter()
        .position(|&m| {
            cumulative += m;
            cumulative >= want
        })
        .unwrap_or(WEIGHT_BUCKETS - 1);
    let mut group = 0;
    for i in 0..candidates.len() {
        if weight_bucket(candidates[i].1) <= last {
            candidates.swap(i, group);
            group += 1;
        }
    }

    let (mut first_lo, mut sorted, mut chunk, mut mass) = (None, 0, FIRST_NUCLEUS_CHUNK, 0.0);
    while sorted < candidates.len() {
        let rest = &mut candidates[sorted..];
        let take = if sorted == 0 && group > 0 {
            // The histogram's buckets, already at the front.
            group
        } else {
            let take = chunk.min(rest.len());
            chunk *= 2;
            if take < rest.len() {
                rest.select_nth_unstable_by(take - 1, heavier_first);
            }
            take
        };
        rest[..take].sort_unstable_by(heavier_first);
        for (i, &(_, w)) in rest[..take].iter().enumerate() {
            mass += w;
            if first_lo.is_none() && mass >= lo {
                first_lo = Some(sorted + i);
            }
            if mass >= hi {
                return (first_lo, Some(sorted + i));
            }
        }
        sorted += take;
    }
    (first_lo, None)
}

#[cfg(test)]
mod tests;
