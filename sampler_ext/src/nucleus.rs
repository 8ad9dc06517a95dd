//! Stage 6 and its draw: top-p over the few tokens heavy enough to matter.
//!
//! [`nucleus_draw`] collects as candidates the tokens above a weight level, with exact weights,
//! widening the level while their mass falls short of the threshold; [`crossing_keys`] finds where
//! the heavier-first running mass reaches the threshold by sorting only one histogram bucket, and
//! [`crossing`] by a sort of the candidates as far as the crossing when rounding leaves the bucket
//! in doubt. The threshold comes from the fast total, as an interval of its error bound; when its
//! ends cross at different tokens, the whole row is summed exactly.

use std::cmp::Ordering;

use crate::adjust::touched_before;
use crate::draw::Row;
use crate::kernels::BLOCK;
use crate::step::Scratch;

/// Top-p looks first at tokens within `e^LEVEL` of the heaviest, widening while they do not reach
/// `top_p` of the mass. Any level whose candidates reach the threshold gives the same crossing, so
/// the first level only trades the cost of one collection against that of a second: too narrow,
/// and the nucleus of real logits under penalties over a long history often lies beyond it, so a
/// second collection follows; too wide, and a peaked row collects, weighs and sorts tokens it does
/// not need. The `full` cases of `benchmarks/sampler.py` measure the choice.
const NUCLEUS_LEVELS: [f64; 5] = [-8.0, -16.0, -32.0, -64.0, f64::NEG_INFINITY];

/// Candidates of top-p are sorted, heaviest first, in chunks of this size, doubling each time, so
/// that a peaked distribution (the usual case) sorts a few dozen tokens.
const FIRST_NUCLEUS_CHUNK: usize = 64;

/// Stages 6 and 7 with top-p: the kept tokens are the fewest heaviest whose mass reaches `top_p`
/// of the total; the token is the first of them, in id order, whose running weight exceeds
/// `u * kept_total`. `total` is the fast total, within `bound` of the exact one.
pub(crate) fn nucleus_draw(
    row: &Row,
    scratch: &mut Scratch,
    top_p: f64,
    total: f64,
    bound: f64,
    u: f64,
) -> u32 {
    let kept = nucleus(row, scratch, top_p, total, bound);
    // The kept tokens in id order (the candidates' order). With no crossing (the running mass fell
    // short of the threshold by rounding alone) every token with a positive weight is kept.
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

/// Where top-p's running mass crosses `top_p` of the total, with `scratch.candidates` left holding
/// the tokens of the last level collected; `None` if it never does.
fn nucleus(
    row: &Row,
    scratch: &mut Scratch,
    top_p: f64,
    total: f64,
    bound: f64,
) -> Option<Crossing> {
    let mut thresholds = (top_p * (total - bound), top_p * (total + bound));
    for level in NUCLEUS_LEVELS {
        collect_candidates(row, scratch, level);
        match scratch_crossing_keys(scratch, thresholds) {
            (Some(a), Some(b)) if a == b => return Some(a),
            (Some(_), _) if thresholds.0 != thresholds.1 => {
                // The fast total cannot decide: settle it with exact sums.
                let exact = top_p * row.exact_sums(scratch);
                thresholds = (exact, exact);
                if let (Some(a), _) = scratch_crossing_keys(scratch, thresholds) {
                    return Some(a);
                }
            }
            _ => {}
        }
    }
    None
}

/// [`crossing_keys`] of `scratch.candidates`, with the scratch's buffers.
fn scratch_crossing_keys(
    scratch: &mut Scratch,
    thresholds: (f64, f64),
) -> (Option<Crossing>, Option<Crossing>) {
    let Scratch {
        candidates,
        sorted,
        crossing_bucket,
        ..
    } = scratch;
    crossing_keys(candidates, thresholds, sorted, crossing_bucket)
}

/// Tokens with weight at least `e^level` (all with a positive weight at `-inf`) into
/// `scratch.candidates`, in id order, with exact weights. Logits are compared in f32 against a cut
/// a little below the level, and only those above it get an exact weight.
fn collect_candidates(row: &Row, scratch: &mut Scratch, level: f64) {
    let floor = level.exp();
    // z >= level  <=>  x >= (level + m) / inv_t; the slack keeps every token the exact test keeps.
    let cut = ((level + row.m) / row.inv_t) as f32;
    let cut = if level == f64::NEG_INFINITY {
        f32::NEG_INFINITY
    } else {
        cut - cut.abs() * 1e-5 - 1e-5
    };
    logits_above(row, scratch, cut);
    let Scratch {
        candidates,
        weights,
        ..
    } = scratch;
    // Exact weights, in place, then the exact test.
    weights.clear();
    weights.extend(candidates.iter().map(|&(_, x)| x * row.inv_t - row.m));
    (row.k.exp_in_place)(weights);
    let mut kept = 0;
    for i in 0..candidates.len() {
        if weights[i] > 0.0 && weights[i] >= floor {
            candidates[kept] = (candidates[i].0, weights[i]);
            kept += 1;
        }
    }
    candidates.truncate(kept);
    weights.resize(BLOCK, 0.0);
    merge_touched(scratch, floor);
}

/// The untouched tokens whose logit is at least `cut`, as `(id, logit)` in `scratch.candidates`,
/// from the blocks whose effective maximum reaches it.
fn logits_above(row: &Row, scratch: &mut Scratch, cut: f32) {
    let Scratch {
        effective_max,
        touched,
        candidates,
        ..
    } = scratch;
    candidates.clear();
    let mut cursor = 0;
    // One bit per token of a block: vector compares find the few tokens above the cut, and a
    // touched token is dropped by clearing its bit (its weight is added apart), so the block is
    // read in place instead of copied into a patch.
    let mut above = [0u32; BLOCK / 32];
    for (b, &block_max) in effective_max.iter().enumerate() {
        let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(row.logits.len()));
        let in_block = touched_before(touched, &mut cursor, hi);
        if block_max == f32::NEG_INFINITY || block_max < cut {
            continue;
        }
        let block = &row.logits[lo..hi];
        let words = &mut above[..block.len().div_ceil(32)];
        (row.k.above_mask)(block, cut, words);
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
}

/// Adds the touched tokens of weight at least `floor` to the candidates, keeping them in id order.
fn merge_touched(scratch: &mut Scratch, floor: f64) {
    let Scratch {
        touched,
        candidates,
        sorted,
        ..
    } = scratch;
    if !touched.iter().any(|t| t.weight > 0.0 && t.weight >= floor) {
        return;
    }
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

/// Buckets of the weight histogram: eight per octave below 1, so 32 octaves (down to about
/// `e^-22`); lighter weights share the last bucket.
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

/// The candidates' mass and number in each [`weight_bucket`].
struct Histogram {
    mass: [f64; WEIGHT_BUCKETS],
    count: [usize; WEIGHT_BUCKETS],
}

impl Histogram {
    fn of(candidates: &[(u32, f64)]) -> Self {
        let mut histogram = Histogram {
            mass: [0.0; WEIGHT_BUCKETS],
            count: [0; WEIGHT_BUCKETS],
        };
        for &(_, w) in candidates {
            debug_assert!(w >= 0.0, "weight {w}");
            let b = weight_bucket(w);
            histogram.mass[b] += w;
            histogram.count[b] += 1;
        }
        histogram
    }

    fn total(&self) -> f64 {
        self.mass.iter().sum()
    }

    /// The crossing of `threshold`, found by sorting only the bucket that holds it and summing the
    /// heavier buckets' mass in candidate order. That sum differs from the heavier-first running
    /// sum of a full sort by rounding alone, at most `2 n 2^-53` of it for `n` terms: `Err` where
    /// the threshold lies closer than that to the running mass on either side of the crossing, or
    /// the rounding could have moved the crossing out of the bucket.
    fn crossing_in_bucket(
        &self,
        candidates: &[(u32, f64)],
        threshold: f64,
        bucket: &mut Vec<(u32, f64)>,
    ) -> Result<Option<Crossing>, ()> {
        let slack = |terms: usize, m: f64| 2.0 * (terms as f64 + 1.0) * f64::EPSILON * m;
        let (mut before, mut terms) = (0.0, 0);
        for b in 0..WEIGHT_BUCKETS {
            if before + self.mass[b] < threshold {
                before += self.mass[b];
                terms += self.count[b];
                continue;
            }
            bucket.clear();
            bucket.extend(candidates.iter().filter(|c| weight_bucket(c.1) == b));
            bucket.sort_unstable_by(heavier_first);
            let mut running = before;
            for (j, &(id, w)) in bucket.iter().enumerate() {
                let previous = running;
                running += w;
                if running >= threshold {
                    let clear = running - slack(terms + j + 1, running) >= threshold
                        && previous + slack(terms + j, previous) < threshold;
                    let kept = terms + j + 1;
                    return if clear {
                        Ok(Some(Crossing {
                            kept,
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
    }
}

/// Heaviest first, ties to the lower id: the order in which top-p keeps tokens.
fn heavier_first(a: &(u32, f64), b: &(u32, f64)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
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

/// [`crossing`]'s answer for each threshold, without reordering `candidates`: from
/// [`Histogram::crossing_in_bucket`] where it can tell, which is exactly the full sort's answer,
/// else from a full sort in `sorted`.
fn crossing_keys(
    candidates: &[(u32, f64)],
    thresholds: (f64, f64),
    sorted: &mut Vec<(u32, f64)>,
    bucket: &mut Vec<(u32, f64)>,
) -> (Option<Crossing>, Option<Crossing>) {
    let histogram = Histogram::of(candidates);
    // As in `crossing`: far short of the lower threshold, no order of summing reaches it.
    if histogram.total() < thresholds.0 * (1.0 - 1e-9) {
        return (None, None);
    }
    let lo = histogram.crossing_in_bucket(candidates, thresholds.0, bucket);
    let hi = if thresholds.1 == thresholds.0 {
        lo
    } else {
        histogram.crossing_in_bucket(candidates, thresholds.1, bucket)
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
/// The histogram says which buckets hold the crossing, so one pass moves the candidates of those
/// buckets to the front and only they are sorted; sorting in doubling chunks, each selected out of
/// the rest, carries on from there should the running mass (summed in another order than the
/// histogram's) fall just short. The running mass is summed in sorted order, so the indices are
/// exactly those of a full sort.
fn crossing(candidates: &mut [(u32, f64)], (lo, hi): (f64, f64)) -> (Option<usize>, Option<usize>) {
    let histogram = Histogram::of(candidates);
    let total = histogram.total();
    // The running mass is the same sum in another order, within n * 2^-53 of it relatively
    // (n <= 2^18): far short of `lo` means the running mass cannot reach it either.
    if total < lo * (1.0 - 1e-9) {
        return (None, None);
    }
    let want = if total >= hi { hi } else { lo };
    let mut cumulative = 0.0;
    let last = histogram
        .mass
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
