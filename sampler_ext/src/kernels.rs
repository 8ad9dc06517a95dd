//! The passes over the vocabulary, written so that the compiler vectorises them.
//!
//! Everything the sampler does over all `V` logits is one of three kernels over a *block* of at most
//! [`BLOCK`] logits: the maximum (with a check for NaN and +inf), the sum of `exp(x * scale - shift)`,
//! and the same exponentials written out. The exponential is our own ([`exp_nonpositive`]): libm's
//! `exp` is a call per element, which keeps the loops over a block from being vectorised.
//!
//! Each kernel is compiled twice, for AVX2 + FMA and for the x86-64 (or other) baseline, and
//! [`Kernels::get`] picks one at run time. The two give results that differ only in the last bit
//! of an exponential, like two libms; one process always uses the same one.

use std::sync::OnceLock;

/// Logits are handled in blocks of this many; per-block maxima and sums let later stages skip most
/// of the vocabulary (1,024 blocks at `V = 262,144`).
pub const BLOCK: usize = 256;

/// Lanes of the accumulators: eight independent sums keep the adds from waiting on each other.
const LANES: usize = 8;

/// The kernels of one instruction set.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// `(max, any NaN or +inf)` of a block; the maximum of an all `-inf` block is `-inf`.
    pub max_and_bad: fn(&[f32]) -> (f32, bool),
    /// `sum(exp(f64(x) * scale - shift))` over a block, for `x * scale - shift <= 0`.
    pub exp_sum: fn(&[f32], f64, f64) -> f64,
    /// `out[i] = exp(f64(x[i]) * scale - shift)`.
    pub exp_into: fn(&[f32], f64, f64, &mut [f64]),
    /// `z[i] = exp(z[i])` in place, for `z[i] <= 0`.
    pub exp_in_place: fn(&mut [f64]),
    /// `out[j] = x[j]` where bit `j % 32` of `mask[j / 32]` is set, else `-inf`.
    pub apply_mask: fn(&[f32], &[u32], &mut [f32]),
    /// The fast, f32 version of `exp_sum` (see [`FastSum`]).
    pub fast_exp_sum: fn(&[f32], FastShift) -> FastSum,
    /// Bit `j % 32` of `out[j / 32]` set where `x[j] >= cut` and `x[j] > -inf`: the candidates of a
    /// block found with vector compares, so that only the few tokens above the cut cost a branch.
    pub above_mask: fn(&[f32], f32, &mut [u32]),
    pub name: &'static str,
}

impl Kernels {
    /// The fastest kernels this CPU can run, chosen once per process.
    pub fn get() -> &'static Kernels {
        static CHOSEN: OnceLock<Kernels> = OnceLock::new();
        CHOSEN.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return avx2::KERNELS;
            }
            Self::BASELINE
        })
    }

    /// The kernels without any optional instruction set (tests hold both sets to libm).
    pub const BASELINE: Kernels = Kernels {
        max_and_bad: max_and_bad::<Separate>,
        exp_sum: exp_sum::<Separate>,
        exp_into: exp_into::<Separate>,
        exp_in_place: exp_in_place::<Separate>,
        fast_exp_sum: fast_exp_sum::<Separate>,
        apply_mask,
        above_mask,
        name: "baseline",
    };

    /// `exp(z)` for one `z <= 0`, with the same arithmetic as the block kernels.
    pub fn exp(&self, z: f64) -> f64 {
        let mut one = [z];
        (self.exp_in_place)(&mut one);
        one[0]
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    // SAFETY (all four): `Kernels::get` hands these out only after `is_x86_feature_detected!` has
    // confirmed AVX2 and FMA, which is all that `#[target_feature]` requires of the caller.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max_and_bad_avx2(x: &[f32]) -> (f32, bool) {
        max_and_bad::<Fused>(x)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_sum_avx2(x: &[f32], scale: f64, shift: f64) -> f64 {
        exp_sum::<Fused>(x, scale, shift)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_into_avx2(x: &[f32], scale: f64, shift: f64, out: &mut [f64]) {
        exp_into::<Fused>(x, scale, shift, out)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_mask_avx2(x: &[f32], mask: &[u32], out: &mut [f32]) {
        apply_mask(x, mask, out)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn above_mask_avx2(x: &[f32], cut: f32, out: &mut [u32]) {
        above_mask(x, cut, out)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_in_place_avx2(z: &mut [f64]) {
        exp_in_place::<Fused>(z)
    }
    /// The f32 pass written with intrinsics (the compiler does not vectorise the generic one):
    /// the same arithmetic as [`exp2_32_nonpositive`], eight lanes at a time, two vectors a turn.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fast_exp_sum_avx2(x: &[f32], shift: FastShift) -> FastSum {
        use std::arch::x86_64::*;
        let chunks = x.chunks_exact(16);
        let tail = fast_exp_sum_scalar::<Fused>(chunks.remainder(), shift);
        let (reference, scale2, offset2) = shift.base2();
        let (reference, scale2, offset2) = (
            _mm256_set1_ps(reference),
            _mm256_set1_ps(scale2),
            _mm256_set1_ps(offset2),
        );
        let floor = _mm256_set1_ps(EXP2_FLOOR);
        let round = _mm256_set1_ps(ROUND32);
        let one = _mm256_set1_ps(1.0);
        let q = EXP2_Q.map(|c| _mm256_set1_ps(c));
        let exp2 = |v: __m256, sum_wt: &mut __m256| {
            let t = _mm256_fmadd_ps(_mm256_sub_ps(v, reference), scale2, offset2);
            // `max` returns its second operand for NaN, so NaN and -inf both land on the floor.
            let t = _mm256_max_ps(t, floor);
            let shifted = _mm256_add_ps(t, round);
            let f = _mm256_sub_ps(t, _mm256_sub_ps(shifted, round));
            let mut p = q[4];
            p = _mm256_fmadd_ps(p, f, q[3]);
            p = _mm256_fmadd_ps(p, f, q[2]);
            p = _mm256_fmadd_ps(p, f, q[1]);
            p = _mm256_fmadd_ps(p, f, q[0]);
            p = _mm256_fmadd_ps(p, f, one);
            // n sits in the low mantissa bits of `shifted`; moved to the exponent field, it
            // multiplies p by 2^n (the bits of 1.5 * 2^23 shift out).
            let w = _mm256_castsi256_ps(_mm256_add_epi32(
                _mm256_castps_si256(p),
                _mm256_slli_epi32::<23>(_mm256_castps_si256(shifted)),
            ));
            *sum_wt = _mm256_fnmadd_ps(w, t, *sum_wt);
            w
        };
        let mut sum = [_mm256_setzero_pd(); 2];
        let mut sum_wt = [_mm256_setzero_ps(); 2];
        for chunk in chunks {
            let p = chunk.as_ptr();
            let w0 = exp2(_mm256_loadu_ps(p), &mut sum_wt[0]);
            let w1 = exp2(_mm256_loadu_ps(p.add(8)), &mut sum_wt[1]);
            // Two weights per lane in f32 (one rounding, within the error bound), then f64.
            let w = _mm256_add_ps(w0, w1);
            sum[0] = _mm256_add_pd(sum[0], _mm256_cvtps_pd(_mm256_castps256_ps128(w)));
            sum[1] = _mm256_add_pd(sum[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(w)));
        }
        let sum_wt = _mm256_add_ps(sum_wt[0], sum_wt[1]);
        let mut lanes = [0.0f64; 8];
        _mm256_storeu_pd(lanes.as_mut_ptr(), sum[0]);
        _mm256_storeu_pd(lanes[4..].as_mut_ptr(), sum[1]);
        let mut lanes_wt = [0.0f32; 8];
        _mm256_storeu_ps(lanes_wt.as_mut_ptr(), sum_wt);
        tail + (FastSum {
            sum: ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
                + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])),
            sum_wt: lanes_wt.iter().map(|&v| f64::from(v)).sum(),
        })
    }

    pub const KERNELS: Kernels = Kernels {
        max_and_bad: |x| unsafe { max_and_bad_avx2(x) },
        exp_sum: |x, scale, shift| unsafe { exp_sum_avx2(x, scale, shift) },
        exp_into: |x, scale, shift, out| unsafe { exp_into_avx2(x, scale, shift, out) },
        exp_in_place: |z| unsafe { exp_in_place_avx2(z) },
        fast_exp_sum: |x, shift| unsafe { fast_exp_sum_avx2(x, shift) },
        apply_mask: |x, mask, out| unsafe { apply_mask_avx2(x, mask, out) },
        above_mask: |x, cut, out| unsafe { above_mask_avx2(x, cut, out) },
        name: "avx2+fma",
    };
}

/// How `a * b + c` is computed: fused (one rounding, one instruction with FMA) or as written.
trait MulAdd {
    fn mul_add(a: f64, b: f64, c: f64) -> f64;
    fn mul_add32(a: f32, b: f32, c: f32) -> f32;
}

/// Only used where FMA is enabled: elsewhere `f64::mul_add` is a slow software call.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Fused;
struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f64, b: f64, c: f64) -> f64 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn mul_add32(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f64, b: f64, c: f64) -> f64 {
        a * b + c
    }
    #[inline(always)]
    fn mul_add32(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `exp(z)` for `z <= 0` (or `-inf`), within about one ulp of the correctly rounded value; `exp(0)`
/// is exactly 1. Branch-free so that a loop over it vectorises.
///
/// `z = n ln2 + r` with `|r| <= ln2 / 2` (Cody and Waite: `n * LN2_HI` is exact), `exp(r)` by its
/// Taylor series to degree 13 (truncation below 2^-57), and `2^n` built in the exponent bits in two
/// halves, so that results down to the smallest subnormal come out without a special case.
#[inline(always)]
fn exp_nonpositive<M: MulAdd>(z: f64) -> f64 {
    const LOG2_E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5 * 2^52 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    const INV_FACTORIALS: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];
    // exp(-1100) is 0 in f64; clamping also maps -inf (and NaN) to a finite input.
    let z = if z > -1100.0 { z } else { -1100.0 };
    let n = (z * LOG2_E + ROUND) - ROUND;
    let r = M::mul_add(n, -LN2_LO, M::mul_add(n, -LN2_HI, z));
    let mut p = INV_FACTORIALS[13];
    for &c in INV_FACTORIALS[..13].iter().rev() {
        p = M::mul_add(p, r, c);
    }
    // n is in [-1587, 0]: split it so that both halves are normal exponents.
    let half = (n * 0.5 + ROUND) - ROUND;
    let rest = n - half;
    let pow2 =
        |k: f64| f64::from_bits(((k + (1023.0 + TWO_52)).to_bits() - TWO_52.to_bits()) << 52);
    p * pow2(half) * pow2(rest)
}

/// `z = (x - reference) * scale + offset`, all in f32: the exact weight of `x` is
/// `exp(f64(x) * s - m)`, and the caller picks `reference` (a logit) and `offset = reference * s - m`
/// so that `z` stays small where it matters (see [`FastSum::error_bound`]).
#[derive(Debug, Clone, Copy)]
pub struct FastShift {
    pub reference: f32,
    pub scale: f32,
    pub offset: f32,
}

impl FastShift {
    /// `(reference, scale, offset)` for `t = z * log2(e) = (x - reference) * scale2 + offset2`:
    /// the fast pass works in base 2, which saves the two-part reduction by ln 2 per weight.
    #[inline(always)]
    fn base2(self) -> (f32, f32, f32) {
        (
            self.reference,
            self.scale * std::f32::consts::LOG2_E,
            self.offset * std::f32::consts::LOG2_E,
        )
    }
}

/// What the fast pass found: `sum` of the weights and `sum_wt`, the sum of `weight * |t|` (`t` the
/// base-2 exponent, `|t| >= |z|`), which bounds how far `sum` can be from the exact (f64) sum.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastSum {
    pub sum: f64,
    pub sum_wt: f64,
}

impl std::ops::Add for FastSum {
    type Output = FastSum;

    fn add(self, other: FastSum) -> FastSum {
        FastSum {
            sum: self.sum + other.sum,
            sum_wt: self.sum_wt + other.sum_wt,
        }
    }
}

impl FastSum {
    /// A bound on `|sum - exact sum|` over `n` logits, for the shift's `|offset|`.
    ///
    /// Per weight, `t` carries four f32 roundings (`x - reference`, `scale` and then
    /// `scale * log2(e)`, the product or fused add) of at most `2^-24 |t|` each, and `offset *
    /// log2(e)` one of `2^-24 |offset|`: `|dt| <= 2^-22 (|t| + |offset|)`, which moves the weight
    /// by `ln 2` times as much relatively, `2^-22.5 (|t| + |offset|)`. `2^t` is within `2^-22`
    /// relative (the polynomial evaluated in f32 within 2^-22.3; tests check 2^-22) and the f32
    /// addition of two weights adds `2^-24`. So a weight is within
    /// `w * 2^-21.5 * (1 + |t| + |offset|)` of the exact one; `REL = 2^-20` leaves a factor of 2.8
    /// to spare (a tighter bound sends fewer draws to the exact fallback). Weights below `2^-125`
    /// may come out as up to `2^-124.5` or 0: the `n * 1e-37` term.
    pub fn error_bound(&self, offset: f32, n: usize) -> f64 {
        const REL: f64 = 1.0 / (1u64 << 20) as f64;
        REL * (self.sum * (1.0 + f64::from(offset.abs())) + self.sum_wt) + n as f64 * 1e-37
    }
}

/// Adding `1.5 * 2^23` to an f32 of magnitude below `2^22` rounds it to an integer (to even) and
/// leaves that integer in the low mantissa bits.
const ROUND32: f32 = 12_582_912.0;

/// Exponents below this are clamped to it: `2^-125` is still a normal number after the polynomial.
const EXP2_FLOOR: f32 = -125.0;

/// `2^f = 1 + f * q(f)` on `[-1/2, 1/2]`: `q` of degree 4, fitted for the least maximum relative
/// error (2^-22.3 evaluated in f32, against 2^-18.4 for Taylor's coefficients of the same degree).
/// The first is the fit's, not ln 2 rounded (they agree to f32 precision).
#[allow(clippy::approx_constant)]
const EXP2_Q: [f32; 5] = [
    0.693_147,
    0.240_222_42,
    0.055_507_336,
    0.009_671_513,
    0.001_326_472_4,
];

/// `2^t` in f32 for `t <= 0`, within 2^-22 relative for `t >= -125`; below (and for NaN) the
/// value at the floor, `2^-125`, under the error bound's absolute term.
#[inline(always)]
fn exp2_32_nonpositive<M: MulAdd>(t: f32) -> f32 {
    let t = if t > EXP2_FLOOR { t } else { EXP2_FLOOR };
    let shifted = t + ROUND32;
    let f = t - (shifted - ROUND32);
    let mut p = EXP2_Q[4];
    for &c in EXP2_Q[..4].iter().rev() {
        p = M::mul_add32(p, f, c);
    }
    let p = M::mul_add32(p, f, 1.0);
    f32::from_bits(p.to_bits().wrapping_add(shifted.to_bits() << 23))
}

/// `fast_exp_sum` one weight at a time, for the few logits a vector loop leaves over (the
/// buffered version below would clear two blocks' worth of scratch for them).
#[inline(always)]
fn fast_exp_sum_scalar<M: MulAdd>(x: &[f32], shift: FastShift) -> FastSum {
    let (reference, scale2, offset2) = shift.base2();
    let mut total = FastSum::default();
    for &v in x {
        let t = M::mul_add32(v - reference, scale2, offset2);
        let t = if t > EXP2_FLOOR { t } else { EXP2_FLOOR };
        let w = exp2_32_nonpositive::<M>(t);
        total.sum += f64::from(w);
        total.sum_wt += f64::from(w * -t);
    }
    total
}

#[inline(always)]
fn fast_exp_sum<M: MulAdd>(x: &[f32], shift: FastShift) -> FastSum {
    let (reference, scale2, offset2) = shift.base2();
    let mut w = [0.0f32; BLOCK];
    let mut wt = [0.0f32; BLOCK];
    let mut total = FastSum::default();
    for part in x.chunks(BLOCK) {
        let (w, wt) = (&mut w[..part.len()], &mut wt[..part.len()]);
        for ((w, wt), &v) in w.iter_mut().zip(wt.iter_mut()).zip(part) {
            let t = M::mul_add32(v - reference, scale2, offset2);
            // Clamped like the exponential's input, so that `0 * -inf` never makes a NaN.
            let t = if t > EXP2_FLOOR { t } else { EXP2_FLOOR };
            *w = exp2_32_nonpositive::<M>(t);
            *wt = *w * -t;
        }
        let mut acc = [0.0f64; LANES];
        let mut acc_wt = [0.0f32; LANES];
        let (chunks, chunks_wt) = (w.chunks_exact(LANES), wt.chunks_exact(LANES));
        for (c, ct) in chunks.clone().zip(chunks_wt.clone()) {
            for l in 0..LANES {
                acc[l] += f64::from(c[l]);
                acc_wt[l] += ct[l];
            }
        }
        for (l, (&v, &vt)) in chunks
            .remainder()
            .iter()
            .zip(chunks_wt.remainder())
            .enumerate()
        {
            acc[l] += f64::from(v);
            acc_wt[l] += vt;
        }
        total = total
            + FastSum {
                sum: ((acc[0] + acc[4]) + (acc[2] + acc[6]))
                    + ((acc[1] + acc[5]) + (acc[3] + acc[7])),
                sum_wt: acc_wt.iter().map(|&v| f64::from(v)).sum(),
            };
    }
    total
}

/// `BITS[i] = 1 << i`: the bit of lane `i` in a word of a token bitmask, as a table so that the mask
/// kernels' loops compile to vector operations.
const BITS: [u32; 32] = {
    let mut bits = [0; 32];
    let mut i = 0;
    while i < 32 {
        bits[i] = 1 << i;
        i += 1;
    }
    bits
};

#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexing by `i` is what makes the loop vectorise
fn apply_mask(x: &[f32], mask: &[u32], out: &mut [f32]) {
    // One constant per lane (`BITS`), so that the loop is a vector AND, compare and blend.
    let full = x.len() / 32;
    for ((out, x), &word) in out.chunks_exact_mut(32).zip(x.chunks_exact(32)).zip(mask) {
        for i in 0..32 {
            out[i] = if word & BITS[i] != 0 {
                x[i]
            } else {
                f32::NEG_INFINITY
            };
        }
    }
    for i in 0..x.len() % 32 {
        let j = full * 32 + i;
        out[j] = if mask[full] & BITS[i] != 0 {
            x[j]
        } else {
            f32::NEG_INFINITY
        };
    }
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexing by `i` is what makes the loop vectorise
fn above_mask(x: &[f32], cut: f32, out: &mut [u32]) {
    // The same shape as `apply_mask`: one constant per lane (`BITS`), a vector compare, AND and
    // OR-reduce.
    let chunks = x.chunks_exact(32);
    let tail = chunks.remainder();
    let full = x.len() / 32;
    for (word, chunk) in out.iter_mut().zip(chunks) {
        let mut w = 0;
        for i in 0..32 {
            let v = chunk[i];
            w |= if v >= cut && v > f32::NEG_INFINITY {
                BITS[i]
            } else {
                0
            };
        }
        *word = w;
    }
    if !tail.is_empty() {
        let mut w = 0;
        for (i, &v) in tail.iter().enumerate() {
            w |= if v >= cut && v > f32::NEG_INFINITY {
                BITS[i]
            } else {
                0
            };
        }
        out[full] = w;
    }
}

#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(v < inf)` is meant to be true for NaN
fn max_and_bad<M: MulAdd>(x: &[f32]) -> (f32, bool) {
    let mut max = [f32::NEG_INFINITY; LANES];
    // NaN and +inf are exactly the values that are not below +inf.
    let mut bad = [false; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            let v = chunk[l];
            max[l] = if v > max[l] { v } else { max[l] };
            bad[l] |= !(v < f32::INFINITY);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        max[l] = if v > max[l] { v } else { max[l] };
        bad[l] |= !(v < f32::INFINITY);
    }
    let m = max
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (m, bad.iter().any(|&b| b))
}

#[inline(always)]
fn exp_sum<M: MulAdd>(x: &[f32], scale: f64, shift: f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += exp_nonpositive::<M>(f64::from(chunk[l]) * scale - shift);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += exp_nonpositive::<M>(f64::from(v) * scale - shift);
    }
    // Pairwise, in a fixed order.
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn exp_into<M: MulAdd>(x: &[f32], scale: f64, shift: f64, out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp_nonpositive::<M>(f64::from(v) * scale - shift);
    }
}

#[inline(always)]
fn exp_in_place<M: MulAdd>(z: &mut [f64]) {
    for v in z.iter_mut() {
        *v = exp_nonpositive::<M>(*v);
    }
}

#[cfg(test)]
mod tests;
