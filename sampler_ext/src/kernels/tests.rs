use super::*;

fn all_kernels() -> Vec<Kernels> {
    vec![Kernels::BASELINE, *Kernels::get()]
}

fn ulps(a: f64, b: f64) -> u64 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
}

#[test]
fn exp_is_within_two_ulps_of_libm() {
    for k in all_kernels() {
        let mut z = -745.0;
        while z <= 0.0 {
            let (ours, libm) = (k.exp(z), z.exp());
            if libm > f64::MIN_POSITIVE {
                assert!(
                    ulps(ours, libm) <= 2,
                    "{} exp({z}) = {ours}, libm {libm}",
                    k.name
                );
            } else {
                assert!(
                    (ours - libm).abs() <= 4.0 * f64::from_bits(1),
                    "{} at {z}",
                    k.name
                );
            }
            z += 0.000_917;
        }
    }
}

#[test]
fn exp_edge_values() {
    for k in all_kernels() {
        assert_eq!(k.exp(0.0), 1.0);
        assert_eq!(k.exp(-0.0), 1.0);
        assert_eq!(k.exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(k.exp(-1e300), 0.0);
        assert_eq!(k.exp(-746.0), 0.0);
        assert!(k.exp(-745.0) > 0.0);
    }
}

#[test]
fn block_kernels_agree_with_scalar_code() {
    let x: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 * -0.037)
        .collect();
    for k in all_kernels() {
        for len in [0, 1, 7, 8, 9, 255, 256, 1000] {
            let block = &x[..len];
            let (max, bad) = (k.max_and_bad)(block);
            assert!(!bad);
            assert_eq!(max, block.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let sum = (k.exp_sum)(block, 0.8, -0.5);
            let mut out = vec![0.0; len];
            (k.exp_into)(block, 0.8, -0.5, &mut out);
            let libm: f64 = block
                .iter()
                .map(|&v| (f64::from(v) * 0.8 + 0.5).exp())
                .sum();
            let ours: f64 = out.iter().sum();
            assert!(
                (sum - libm).abs() <= 1e-13 * libm.max(1.0),
                "{} {len}",
                k.name
            );
            assert!(
                (ours - libm).abs() <= 1e-13 * libm.max(1.0),
                "{} {len}",
                k.name
            );
        }
    }
}

#[test]
fn fast_exp_is_within_its_bound() {
    // Per weight the error bound allows `2^-21 (1 + |t|)` relative (see `FastSum::error_bound`);
    // the exponential itself must stay within 2^-22 where `t` is exact (scale 1 / log2(e)).
    for k in all_kernels() {
        let mut t = -124.9f32;
        let (mut worst_exact_t, mut worst_scaled) = (0.0f64, 0.0f64);
        while t <= 0.0 {
            let mut buf = [0.0f32; 16];
            buf[3] = t;
            let in_base2 = FastShift {
                reference: 0.0,
                scale: 1.0 / std::f32::consts::LOG2_E,
                offset: 0.0,
            };
            let fast = (k.fast_exp_sum)(&buf[3..4], in_base2);
            // The shift's own roundings make `t` inexact by up to ~2^-23 |t|: weigh that apart.
            let (_, scale2, _) = in_base2.base2();
            let t_used = f64::from(t * scale2);
            let exact = t_used.exp2();
            worst_exact_t = worst_exact_t.max((fast.sum - exact).abs() / exact);
            let libm = f64::from(t / std::f32::consts::LOG2_E).exp();
            worst_scaled =
                worst_scaled.max((fast.sum - libm).abs() / libm / (1.0 + f64::from(t.abs())));
            t += 0.000_53;
        }
        assert!(
            worst_exact_t < 1.0 / (1u64 << 22) as f64,
            "{} worst {worst_exact_t}",
            k.name
        );
        assert!(
            worst_scaled < 1.0 / (1u64 << 21) as f64,
            "{} worst {worst_scaled}",
            k.name
        );
    }
}

#[test]
fn fast_sums_are_within_their_error_bound() {
    let x: Vec<f32> = (0..4099)
        .map(|i| ((i * 7919) % 4099) as f32 * -0.011 + 31.7)
        .collect();
    for k in all_kernels() {
        for (scale, m) in [(1.0f64, 31.7f64), (1.25, 39.9), (0.5, 15.0), (10.0, 400.0)] {
            let reference = 31.7f32;
            let offset = (f64::from(reference) * scale - m) as f32;
            let shift = FastShift {
                reference,
                scale: scale as f32,
                offset,
            };
            let fast = x
                .chunks(BLOCK)
                .map(|b| (k.fast_exp_sum)(b, shift))
                .fold(FastSum::default(), |a, b| a + b);
            let exact: f64 = x.iter().map(|&v| (f64::from(v) * scale - m).exp()).sum();
            let bound = fast.error_bound(offset, x.len());
            assert!(
                (fast.sum - exact).abs() <= bound,
                "{} {scale}: {} vs {exact}, bound {bound}",
                k.name,
                fast.sum
            );
            assert!(
                bound < 1e-4 * exact.max(1e-30) + 1e-30,
                "bound too loose: {bound} for {exact}"
            );
        }
    }
}

#[test]
fn above_mask_marks_exactly_the_values_at_or_above_the_cut() {
    let x: Vec<f32> = (0..300)
        .map(|i| match i % 7 {
            0 => f32::NEG_INFINITY,
            1 => 0.5,
            _ => ((i * 7919) % 300) as f32 * -0.01 + 1.0,
        })
        .collect();
    for k in all_kernels() {
        for len in [0usize, 1, 31, 32, 33, 256, 300] {
            for cut in [f32::NEG_INFINITY, -1.5, 0.5, 0.75, 2.0] {
                let mut out = vec![u32::MAX; len.div_ceil(32)];
                (k.above_mask)(&x[..len], cut, &mut out);
                for (j, &v) in x[..len].iter().enumerate() {
                    let bit = (out[j / 32] >> (j % 32)) & 1 == 1;
                    assert_eq!(
                        bit,
                        v >= cut && v > f32::NEG_INFINITY,
                        "{} {len} {cut} {j}",
                        k.name
                    );
                }
                if len % 32 != 0 {
                    assert_eq!(out[len / 32] >> (len % 32), 0, "{} {len}", k.name);
                }
            }
        }
    }
}

#[test]
fn nan_and_plus_infinity_are_bad_minus_infinity_is_not() {
    for k in all_kernels() {
        for len in [1, 8, 13, 256] {
            for at in [0, len / 2, len - 1] {
                for (value, expect_bad) in [
                    (f32::NAN, true),
                    (f32::INFINITY, true),
                    (f32::NEG_INFINITY, false),
                ] {
                    let mut x = vec![-1.0f32; len];
                    x[at] = value;
                    assert_eq!(
                        (k.max_and_bad)(&x).1,
                        expect_bad,
                        "{} {len} {at} {value}",
                        k.name
                    );
                }
            }
        }
        assert_eq!(
            (k.max_and_bad)(&[f32::NEG_INFINITY; 9]).0,
            f32::NEG_INFINITY
        );
    }
}
