//! One sampling step of one row: the stages, in the order they run.
//!
//! 1. **Touched tokens** (`adjust.rs`). The logit bias and the penalties change only the tokens
//!    they name: for those, `value = (logit + bias) - penalty`, with `penalty = frequency_penalty *
//!    count + presence_penalty` for a token that is `count > 0` times in the sequence's history (0
//!    otherwise), and `value = -inf` where the mask forbids the token; every other token's value is
//!    its logit. A mask (bit `j % 32` of word `j / 32` set: token `j` allowed) is applied to a copy
//!    of the row; a mask of all ones is no mask.
//! 2. **Scan** (`scan.rs`), the one pass over the row, in blocks of [`BLOCK`] logits: refuse NaN
//!    and +inf logits and a row that is all `-inf`; note each block's maximum and, while the block
//!    is in L1, what the later stages need of it: the maximum of its untouched, allowed tokens, the
//!    fast f32 sum of their weights at this temperature, and, with logprobs, the fast sum of
//!    `exp(logit - block maximum)`.
//! 3. **Logprobs** (`logprobs.rs`, only if asked for): the log-softmax of the *raw* logits, as
//!    OpenAI reports them (the mask, bias, penalties, temperature and top-p do not change them),
//!    normalised by the scan's sums; and the `top_logprobs` best `(token, logprob)` pairs, ties to
//!    the lower id, read only from the blocks whose maximum can hold one of them.
//! 4. **Greedy** (`draw.rs`). Below [`GREEDY_BELOW_TEMPERATURE`] the token is the argmax of
//!    `value`, ties to the lowest id (as llama.cpp's greedy sampler), and no random number is
//!    drawn; the step ends here.
//! 5. **Weights** (`draw.rs`). Otherwise `weight = exp(value / temperature - m)`, `m` the largest
//!    `value / temperature`: exact (f64) for the touched tokens, and for each block its scan sum
//!    scaled to the row, with a bound on the fast sums' error. One uniform `u` in `[0, 1)` from the
//!    sequence's ChaCha20 stream.
//! 6. **Top-p** (`nucleus.rs`, with `top_p < 1`). Keep the fewest tokens, taken by decreasing
//!    weight (ties: lower id first), whose weights summed in that order reach `top_p * total`; at
//!    least one token is always kept. Only the tokens within `e^-8` of the heaviest are looked at,
//!    widened to `e^-16`, `e^-32`, `e^-64` and then all while their mass falls short of the
//!    threshold; of these only the histogram bucket that holds the crossing is sorted, unless
//!    rounding could move the crossing, when they are sorted heaviest first as far as it; and when
//!    the two ends of the fast total's error bound give different crossings, the whole row is
//!    summed exactly to settle the threshold.
//! 7. **Draw** (`draw.rs`). Walking the kept tokens in increasing id order, the token is the first
//!    whose running weight sum exceeds `u * kept_total`. Without top-p the walk skips whole blocks
//!    by their fast sums, and is redone with exact f64 sums unless `u * total` lies clear of the
//!    chosen token's edges by twice the sums' error bound.
//! 8. **Record** ([`Sequence::commit`]): the token goes into the history, so that later penalties
//!    see it, and the random stream moves on. A batch records its rows only once every row has
//!    succeeded.
//!
//! So, but for a mask's copy of the row and the exact fallbacks, nothing runs per token over the
//! whole vocabulary except the scan's vectorised passes (`kernels.rs`); every later stage reads
//! only the touched tokens and the blocks whose maximum or sum can matter.
//!
//! The result depends only on the seed and the logits, up to rounding: weights are f64 exponentials
//! within two ulps of libm's, and sums are taken in blocks rather than one by one, so a draw can
//! differ from exact arithmetic only when `u` lands within about 1e-15 (relative) of a boundary
//! between two tokens. Fast f32 sums are used only where their error bound shows that they cannot
//! change the outcome. `benchmarks/sampler.py` measures the stages' cost; its results are in
//! `docs/benchmarks.md`.
//!
//! [`GREEDY_BELOW_TEMPERATURE`]: crate::params::GREEDY_BELOW_TEMPERATURE
//! [`Sequence::commit`]: crate::sequence::Sequence::commit

use crate::adjust::{self, Touched};
use crate::error::SamplerError;
use crate::kernels::{FastSum, Kernels, BLOCK};
use crate::params::Params;
use crate::rng::SequenceRng;
use crate::scan::{self, Pass};
use crate::sequence::SequenceState;
use crate::{draw, logprobs};

/// Buffers kept between steps, so that a step allocates nothing once they have grown.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    pub(crate) raw_max: Vec<f32>,
    pub(crate) effective_max: Vec<f32>,
    /// Fast weight sums of each block, relative to its effective maximum until stage 5 scales them.
    pub(crate) fast_sums: Vec<FastSum>,
    /// Fast sums of `exp(x - raw block maximum)`, for the logprobs' normaliser.
    pub(crate) normaliser_sums: Vec<f64>,
    pub(crate) factors: Vec<f64>,
    /// Fast block sums plus the touched weights of the block.
    pub(crate) block_totals: Vec<f64>,
    pub(crate) exact_sums: Vec<f64>,
    pub(crate) touched: Vec<Touched>,
    /// Top-p's candidates `(id, exact weight)`, in id order.
    pub(crate) candidates: Vec<(u32, f64)>,
    /// Room for reordered candidates (the merge of touched tokens, a full sort when needed).
    pub(crate) sorted: Vec<(u32, f64)>,
    /// The candidates of the histogram bucket where top-p's running mass crosses its threshold.
    pub(crate) crossing_bucket: Vec<(u32, f64)>,
    pub(crate) patch: Vec<f32>,
    /// The row with the mask applied (forbidden tokens at `-inf`), when there is a mask.
    pub(crate) masked: Vec<f32>,
    pub(crate) weights: Vec<f64>,
    pub(crate) top: Vec<(u32, f32)>,
    /// The top logprobs of the last step, `(token, raw logprob)`, most likely first.
    pub top_logprobs: Vec<(u32, f64)>,
}

/// The outcome of a step, not yet applied to the sequence (see
/// [`crate::sequence::Sequence::commit`]).
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

/// Stages 1 to 7. On error the sequence is untouched (nothing here mutates it).
pub fn choose(
    params: &Params,
    state: &SequenceState,
    rng: &SequenceRng,
    logits: &[f32],
    mask: Option<&[u32]>,
    scratch: &mut Scratch,
) -> Result<Pending, SamplerError> {
    check_lengths(params.vocab_size, logits, mask)?;
    let k = Kernels::get();
    scratch.patch.resize(BLOCK, 0.0);
    scratch.weights.resize(BLOCK, 0.0);

    let wants_logprobs = params.logprobs || params.top_logprobs > 0;
    // 1. Touched tokens and the mask, before the scan, so that it weighs each block while in L1.
    let mask = mask.filter(|m| !adjust::allows_everything(m, logits.len()));
    adjust::fill_touched(params, state, mask, &mut scratch.touched);
    let raw_greedy = params.greedy && scratch.touched.is_empty() && mask.is_none();
    let mut masked = std::mem::take(&mut scratch.masked);
    let base = match mask {
        Some(mask) => adjust::apply_mask(logits, mask, &mut masked, k),
        None => logits,
    };

    // 2. Scan.
    let pass = Pass {
        effective: !raw_greedy,
        masked: mask.is_some(),
        weigh: (!params.greedy).then(|| (1.0 / params.temperature) as f32),
        normalise: wants_logprobs,
    };
    let result = scan::scan(logits, base, pass, scratch, k).and_then(|max| {
        // 3. Logprobs.
        let log_z = if wants_logprobs {
            logprobs::log_normaliser(scratch, max, k)
        } else {
            f64::NAN
        };
        logprobs::top_logprobs(
            logits,
            params.top_logprobs.min(logits.len()),
            log_z,
            scratch,
        );
        // 4. Greedy, or 5. to 7. weights, top-p and draw.
        let chosen = if raw_greedy {
            Ok((draw::raw_argmax(logits, &scratch.raw_max, max), None))
        } else if params.greedy {
            draw::greedy(base, mask.is_some(), scratch).map(|token| (token, None))
        } else {
            let mut rng = rng.clone();
            draw::draw(params, base, mask.is_some(), scratch, &mut rng, k)
                .map(|token| (token, Some(rng)))
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

fn check_lengths(vocab: usize, logits: &[f32], mask: Option<&[u32]>) -> Result<(), SamplerError> {
    if logits.len() != vocab {
        return Err(SamplerError::Length {
            expected: vocab,
            got: logits.len(),
        });
    }
    match mask {
        Some(mask) if mask.len() != mask_words(vocab) => Err(SamplerError::MaskLength {
            expected: mask_words(vocab),
            got: mask.len(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
