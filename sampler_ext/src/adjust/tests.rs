use super::*;

#[test]
fn masks_read_bit_j_mod_32_of_word_j_div_32() {
    let mask = [0b101u32, 1 << 31, 0];
    assert!(is_allowed(&mask, 0) && !is_allowed(&mask, 1) && is_allowed(&mask, 2));
    assert!(is_allowed(&mask, 63) && !is_allowed(&mask, 64));
    assert!(allows_everything(&[u32::MAX, 0b111], 35));
    assert!(!allows_everything(&[u32::MAX, 0b101], 35));
    let logits: Vec<f32> = (0..70).map(|i| i as f32).collect();
    let mut out = vec![0.0; 70];
    for k in [Kernels::BASELINE, *Kernels::get()] {
        (k.apply_mask)(&logits, &mask, &mut out);
        for (j, &x) in out.iter().enumerate() {
            assert_eq!(
                x,
                if is_allowed(&mask, j) {
                    j as f32
                } else {
                    f32::NEG_INFINITY
                },
                "{} {j}",
                k.name
            );
        }
    }
}
