//! Stages 4, 5 and 7: the greedy choice, the weights at the temperature, and the seeded draw.
//!
//! Weights are summed fast (the scan's f32 block sums) wherever the sums' error bound shows that
//! exact f64 sums would give the same token; where it does not, the decision is redone exactly.

use crate::adjust::{effective_block, touched_before};
use crate::error::SamplerError;
use crate::kernels::{FastSum, Kernels, BLOCK};
use crate::nucleus::nucleus_draw;
use crate::params::Params;
use crate::rng::SequenceRng;
use crate::scan::block_factors;
use crate::step::Scratch;

/// Stage 4 without touched tokens or mask: the first token holding the row's maximum `max`.
pub(crate) fn raw_argmax(logits: &[f32], raw_max: &[f32], max: f32) -> u32 {
    // The scan found `max` in some block, so both searches succeed; the fallbacks are unreachable.
    let b = raw_max.iter().position(|&m| m == max).unwrap_or(0);
    let lo = b * BLOCK;
    let i = logits[lo..].iter().position(|&x| x == max).unwrap_or(0);
    (lo + i) as u32
}

/// Stage 4: the highest value of `base` (the row with masked tokens at `-inf`), touched tokens at
/// their own values, ties to the lowest id.
pub(crate) fn greedy(
    base: &[f32],
    masked: bool,
    scratch: &mut Scratch,
) -> Result<u32, SamplerError> {
    let untouched_max = untouched_max(scratch);
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
        let hi = ((b + 1) * BLOCK).min(base.len());
        let in_block = touched_before(&scratch.touched, &mut cursor, hi);
        let block = effective_block(base, b, in_block, &mut scratch.patch);
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

/// Stages 5 to 7 for a temperature that is not greedy, on `base` (the row with masked tokens at
/// `-inf`); draws from `rng`.
pub(crate) fn draw(
    params: &Params,
    base: &[f32],
    masked: bool,
    scratch: &mut Scratch,
    rng: &mut SequenceRng,
    k: &Kernels,
) -> Result<u32, SamplerError> {
    let inv_t = 1.0 / params.temperature;
    let mut m = f64::from(untouched_max(scratch)) * inv_t;
    for t in &scratch.touched {
        m = m.max(t.value * inv_t);
    }
    if m == f64::NEG_INFINITY {
        return Err(nothing_allowed(masked));
    }
    let touched_total = weigh_touched(scratch, inv_t, m, k);
    let fast = scale_fast_sums(scratch, inv_t, m, k);
    // Each block's `z` is relative to its own maximum, so the f32 part has no offset; the factor's
    // f64 argument is within about `|m| 2^-52` and stands in for it. Not finite only for absurd
    // inputs (logits near f32::MAX): then every decision goes exact.
    let offset = (m.abs() * f64::powi(2.0, -30)) as f32;
    let bound = Some(fast.error_bound(offset, base.len()))
        .filter(|b| b.is_finite())
        .unwrap_or(f64::INFINITY);
    let total = fast.sum + touched_total;
    let u = rng.next_uniform();

    let row = Row {
        logits: base,
        inv_t,
        m,
        k,
    };
    if params.nucleus {
        Ok(nucleus_draw(&row, scratch, params.top_p, total, bound, u))
    } else {
        Ok(row.full_draw(scratch, total, bound, u))
    }
}

/// The largest effective block maximum: the highest value among the untouched, allowed tokens.
fn untouched_max(scratch: &Scratch) -> f32 {
    scratch
        .effective_max
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

fn nothing_allowed(masked: bool) -> SamplerError {
    if masked {
        SamplerError::NothingAllowed
    } else {
        SamplerError::AllImpossible
    }
}

/// Sets the touched tokens' exact weights, all in one call of the block kernel (the same
/// arithmetic as `k.exp`, one indirect call instead of one per token); returns their sum.
fn weigh_touched(scratch: &mut Scratch, inv_t: f64, m: f64, k: &Kernels) -> f64 {
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
    touched.iter().map(|t| t.weight).sum()
}

/// Scales the scan's fast sums, each relative to its block's effective maximum `e`, by
/// `exp(e * inv_t - m)` (f64), into the units of the exact weights `exp(x * inv_t - m)`; returns
/// their total.
fn scale_fast_sums(scratch: &mut Scratch, inv_t: f64, m: f64, k: &Kernels) -> FastSum {
    let Scratch {
        effective_max,
        fast_sums,
        factors,
        ..
    } = scratch;
    block_factors(effective_max, inv_t, m, factors, k);
    let mut fast = FastSum::default();
    for (sum, &factor) in fast_sums.iter_mut().zip(factors.iter()) {
        *sum = FastSum {
            sum: sum.sum * factor,
            sum_wt: sum.sum_wt * factor,
        };
        fast = fast + *sum;
    }
    fast
}

/// What the weight stages need to know about the row.
pub(crate) struct Row<'a> {
    /// The row with masked tokens at `-inf`.
    pub(crate) logits: &'a [f32],
    pub(crate) inv_t: f64,
    pub(crate) m: f64,
    pub(crate) k: &'a Kernels,
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

    /// The exact total weight, each block's into `scratch.exact_sums`: all exponentials in f64
    /// (the fallback when the fast total is too uncertain to decide).
    pub(crate) fn exact_sums(&self, scratch: &mut Scratch) -> f64 {
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

    /// Stage 7 without top-p: the first token, in id order, whose running weight exceeds
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
    /// and, should no token reach it, ends on the last token with a positive weight.
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
