//! Stage 3: logprobs of the raw logits, as OpenAI reports them.
//!
//! The normaliser `log(sum(exp(logits)))` comes from the scan's fast f32 block sums, each relative
//! to its block's maximum and scaled here by an exact f64 factor: within about 1e-6 of the exact
//! value, and the logprobs are reported as float32 anyway.

use crate::kernels::{Kernels, BLOCK};
use crate::scan::block_factors;
use crate::step::Scratch;

/// `log(sum(exp(logits)))` from the scan's normaliser sums; `max` is the row's maximum.
pub(crate) fn log_normaliser(scratch: &mut Scratch, max: f32, k: &Kernels) -> f64 {
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

/// The `k` best `(token, logit - log_z)` pairs into `scratch.top_logprobs`, most likely first, ties
/// by lower id.
pub(crate) fn top_logprobs(logits: &[f32], k: usize, log_z: f64, scratch: &mut Scratch) {
    top_raw(logits, &scratch.raw_max, k, &mut scratch.top);
    scratch.top_logprobs.clear();
    scratch.top_logprobs.extend(
        scratch
            .top
            .iter()
            .map(|&(id, x)| (id, f64::from(x) - log_z)),
    );
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
