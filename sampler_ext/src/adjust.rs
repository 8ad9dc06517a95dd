//! Stage 1: the mask, logit bias and penalties, on only the tokens they touch.
//!
//! Bias and penalties name only the tokens of the bias map and of the history, few next to the
//! vocabulary, so they are kept apart as [`Touched`] tokens, sorted by id, instead of being written
//! into a copy of the row: the later stages read each block of the row as it is and treat its
//! touched tokens on the side. A mask, which may forbid any token, is applied to a copy of the row
//! ([`apply_mask`]).

use crate::kernels::{Kernels, BLOCK};
use crate::params::Params;
use crate::sequence::SequenceState;

/// A token whose value bias, penalties or a mask changed; its weight is computed apart, exactly.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Touched {
    pub(crate) id: u32,
    /// The raw logit, kept so that later stages need not read the row at a scattered id again.
    pub(crate) logit: f32,
    /// `(logit + bias) - penalty`, or `-inf` when the mask forbids it. Set by the scan, which reads
    /// the logit while its block is in L1 rather than at a scattered id of a row not yet in cache.
    pub(crate) value: f64,
    /// 0 when the token has no bias (adding 0 changes no value that matters).
    bias: f64,
    /// `frequency_penalty * count + presence_penalty`, 0 when the token is not in the history.
    penalty: f64,
    allowed: bool,
    /// `exp(value / temperature - m)`, set by stage 5.
    pub(crate) weight: f64,
}

impl Touched {
    /// Sets the logit and the value; the value is computed in f64, bias first, as the recording
    /// that `tests/sampler_ext/test_recorded.py` replays requires to the last bit.
    pub(crate) fn read(&mut self, logit: f32) {
        self.logit = logit;
        self.value = if self.allowed {
            (f64::from(logit) + self.bias) - self.penalty
        } else {
            f64::NEG_INFINITY
        };
    }
}

/// The touched tokens of a step: every token with a bias or (when penalised) in the history, with
/// its bias, its penalty and whether the mask allows it, sorted by id. Their values are set later,
/// by the scan ([`Touched::read`]).
pub(crate) fn fill_touched(
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
pub(crate) fn touched_before<'a>(
    touched: &'a [Touched],
    cursor: &mut usize,
    hi: usize,
) -> &'a [Touched] {
    let start = *cursor;
    while *cursor < touched.len() && (touched[*cursor].id as usize) < hi {
        *cursor += 1;
    }
    &touched[start..*cursor]
}

/// Block `b` as the later stages see it: touched tokens set to `-inf` (their weights are handled
/// apart). Copies into `patch` only when the block has touched tokens.
pub(crate) fn effective_block<'a>(
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

/// The row with the tokens `mask` forbids at `-inf`, written into `masked`.
pub(crate) fn apply_mask<'a>(
    logits: &[f32],
    mask: &[u32],
    masked: &'a mut Vec<f32>,
    k: &Kernels,
) -> &'a [f32] {
    masked.resize(logits.len(), 0.0);
    (k.apply_mask)(logits, mask, masked);
    &masked[..]
}

pub(crate) fn is_allowed(mask: &[u32], id: usize) -> bool {
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

pub(crate) fn allows_everything(mask: &[u32], vocab: usize) -> bool {
    allows_range(mask, 0, vocab)
}

#[cfg(test)]
mod tests;
