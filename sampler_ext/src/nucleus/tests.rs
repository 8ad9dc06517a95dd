use super::*;
use crate::test_inputs::Lcg;

#[test]
fn the_nucleus_crossing_is_the_brute_force_one() {
    let mut rng = Lcg(3);
    for n in [1usize, 5, 64, 65, 300, 5000] {
        let mut candidates: Vec<(u32, f64)> = (0..n)
            .map(|i| (i as u32, (rng.next() * 4.0).floor()))
            .collect();
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        for p in [1e-9, 0.3, 0.9, 0.999, 1.0] {
            let mut sorted = candidates.clone();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut mass = 0.0;
            let expected = sorted.iter().position(|c| {
                mass += c.1;
                mass >= p * total
            });
            let key = |i: usize| Crossing {
                kept: i + 1,
                weight: sorted[i].1,
                id: sorted[i].0,
            };
            let (mut buf, mut bucket) = (Vec::new(), Vec::new());
            let keys = crossing_keys(&candidates, (p * total, p * total), &mut buf, &mut bucket);
            assert_eq!(keys, (expected.map(key), expected.map(key)), "n {n} p {p}");
            let (lo, hi) = crossing(&mut candidates, (p * total, p * total));
            assert_eq!((lo, hi), (expected, expected), "n {n} p {p}");
            if let Some(i) = expected {
                assert_eq!(&candidates[..=i], &sorted[..=i]);
            }
        }
    }
}

#[test]
fn the_nucleus_crossing_of_two_thresholds_is_the_brute_force_one() {
    // Weights as the sampler makes them (exponentials spread over many histogram buckets, some
    // below the last bucket), thresholds apart as the fast bound makes them.
    let mut rng = Lcg(11);
    for n in [1usize, 2, 63, 64, 65, 1000, 4000] {
        let candidates: Vec<(u32, f64)> = (0..n)
            .map(|i| (i as u32 * 3, (-30.0 * rng.next() * rng.next()).exp()))
            .collect();
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut sorted = candidates.clone();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let first_reaching = |t: f64| {
            let mut mass = 0.0;
            sorted.iter().position(|c| {
                mass += c.1;
                mass >= t
            })
        };
        for p in [1e-12, 0.1, 0.5, 0.9, 0.99, 1.0, 1.5] {
            for spread in [0.0, 1e-9, 1e-3, 0.2] {
                let (lo, hi) = (p * total * (1.0 - spread), p * total * (1.0 + spread));
                let mut shuffled = candidates.clone();
                let (a, b) = crossing(&mut shuffled, (lo, hi));
                let expected = (first_reaching(lo), first_reaching(hi));
                let key = |i: usize| Crossing {
                    kept: i + 1,
                    weight: sorted[i].1,
                    id: sorted[i].0,
                };
                let (mut buf, mut bucket) = (Vec::new(), Vec::new());
                assert_eq!(
                    crossing_keys(&candidates, (lo, hi), &mut buf, &mut bucket),
                    (expected.0.map(key), expected.1.map(key)),
                    "keys: n {n} p {p} spread {spread}"
                );
                assert_eq!((a, b), expected, "n {n} p {p} spread {spread}");
                if let Some(i) = b.or(a) {
                    assert_eq!(
                        &shuffled[..=i],
                        &sorted[..=i],
                        "n {n} p {p} spread {spread}"
                    );
                }
            }
        }
    }
}
