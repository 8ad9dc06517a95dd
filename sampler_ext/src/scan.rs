//! Stage 2: the one pass over the row.
//!
//! Every later stage works from what this pass notes of each block of [`BLOCK`] logits, so the row
//! is read once: the other passes over a block run while the block is still in L1.

use crate::adjust::{effective_block, touched_before, Touched};
use crate::error::SamplerError;
use crate::kernels::{FastShift, FastSum, Kernels, BLOCK};
use crate::step::Scratch;

/// What the scan works out of each block besides its raw maximum, while the block is in L1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pass {
    /// The block's effective maximum: its untouched, allowed tokens only.
    pub(crate) effective: bool,
    /// Whether `base` has masked tokens at `-inf`.
    pub(crate) masked: bool,
    /// The fast weights of the effective block at this inverse temperature, relative to the
    /// block's effective maximum (scaled to the row's maximum once that is known).
    pub(crate) weigh: Option<f32>,
    /// The fast sum of `exp(x - raw block maximum)`, for the normaliser of the logprobs.
    pub(crate) normalise: bool,
}

/// Block maxima of the raw logits and whatever else `pass` asks of each block, into `scratch`;
/// sets the touched tokens' values. Returns the row's maximum, and refuses NaN, +inf and a row
/// that is all `-inf`.
pub(crate) fn scan(
    logits: &[f32],
    base: &[f32],
    pass: Pass,
    scratch: &mut Scratch,
    k: &Kernels,
) -> Result<f32, SamplerError> {
    let blocks = logits.len().div_ceil(BLOCK);
    scratch.raw_max.resize(blocks, f32::NEG_INFINITY);
    scratch.effective_max.resize(blocks, f32::NEG_INFINITY);
    scratch.fast_sums.resize(blocks, FastSum::default());
    scratch.normaliser_sums.resize(blocks, 0.0);
    if scan_blocks(logits, base, pass, scratch, k) {
        // Rare: find the first offender for the message.
        if let Some((token, &value)) = logits
            .iter()
            .enumerate()
            .find(|(_, &x)| x.is_nan() || x == f32::INFINITY)
        {
            return Err(SamplerError::NonFiniteLogit { token, value });
        }
    }
    let max = scratch
        .raw_max
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    if max == f32::NEG_INFINITY {
        return Err(SamplerError::AllImpossible);
    }
    Ok(max)
}

/// The scan proper; returns whether any block held NaN or +inf.
fn scan_blocks(
    logits: &[f32],
    base: &[f32],
    pass: Pass,
    scratch: &mut Scratch,
    k: &Kernels,
) -> bool {
    let Scratch {
        raw_max,
        effective_max,
        fast_sums,
        normaliser_sums,
        touched,
        patch,
        ..
    } = scratch;
    let mut bad = false;
    let mut cursor = 0;
    for b in 0..raw_max.len() {
        let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(logits.len()));
        let block = &logits[lo..hi];
        let (raw, is_bad) = (k.max_and_bad)(block);
        raw_max[b] = raw;
        bad |= is_bad;
        if pass.normalise {
            normaliser_sums[b] = fast_sum(block, raw, 1.0, k).sum;
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
        let (effective, sum) = weigh_block(base, b, raw, in_block, pass, patch, k);
        effective_max[b] = effective;
        if let Some(sum) = sum {
            fast_sums[b] = sum;
        }
    }
    bad
}

/// The effective maximum of block `b` (of `base`, touched tokens left out), and its fast weight
/// sum when `pass` weighs.
fn weigh_block(
    base: &[f32],
    b: usize,
    raw: f32,
    in_block: &[Touched],
    pass: Pass,
    patch: &mut [f32],
    k: &Kernels,
) -> (f32, Option<FastSum>) {
    // Without a mask the raw maximum stands unless a touched token holds it, which bias and
    // penalties seldom do.
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
    let sum = pass
        .weigh
        .map(|scale| fast_sum(effective_block, effective, scale, k));
    (effective, sum)
}

/// The fast sum of `exp((x - max) * scale)` over a block whose maximum is `max`; nothing for a
/// block at `-inf`.
fn fast_sum(block: &[f32], max: f32, scale: f32, k: &Kernels) -> FastSum {
    if max == f32::NEG_INFINITY {
        return FastSum::default();
    }
    let shift = FastShift {
        reference: max,
        scale,
        offset: 0.0,
    };
    (k.fast_exp_sum)(block, shift)
}

/// `factors[b] = exp(maxima[b] * scale - shift)`, 0 for a block at `-inf`: what turns a block's
/// fast sum, taken relative to its own maximum, into the row's units.
pub(crate) fn block_factors(
    maxima: &[f32],
    scale: f64,
    shift: f64,
    factors: &mut Vec<f64>,
    k: &Kernels,
) {
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
