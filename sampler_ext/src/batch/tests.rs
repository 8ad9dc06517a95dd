use super::*;

#[test]
fn a_failed_row_leaves_every_sequence_unchanged() {
    let mut batch = BatchSampler::new(8).unwrap();
    let mut twin = BatchSampler::new(8).unwrap();
    for b in [&mut batch, &mut twin] {
        b.add(
            1,
            &SamplerConfig {
                top_p: 0.9,
                ..SamplerConfig::new(1)
            },
        )
        .unwrap();
        b.add(2, &SamplerConfig::new(2)).unwrap();
    }
    let mut logits = vec![0.5f32; 16];
    logits[12] = f32::NAN;
    let error = batch.sample(&logits, &[1, 2], None).unwrap_err();
    assert_eq!(
        error.to_string(),
        "row 1 (key 2): logit of token 4 is NaN; logits must not be NaN or +inf"
    );
    assert!(matches!(
        batch.sample(&logits[..8], &[3], None),
        Err(SamplerError::Row { row: 0, key: 3, .. })
    ));
    assert_eq!(batch.generated(1).unwrap(), 0);
    let good: Vec<f32> = (0..16).map(|i| (i % 5) as f32).collect();
    for _ in 0..5 {
        assert_eq!(
            batch.sample(&good, &[1, 2], None).unwrap().tokens,
            twin.sample(&good, &[1, 2], None).unwrap().tokens
        );
    }
}

#[test]
fn named_rows_sample_as_the_same_rows_copied_out() {
    let config = |key| SamplerConfig {
        temperature: 0.9,
        top_logprobs: 2,
        ..SamplerConfig::new(key)
    };
    let mut in_place = BatchSampler::new(8).unwrap();
    let mut copied = BatchSampler::new(8).unwrap();
    for b in [&mut in_place, &mut copied] {
        b.add(1, &config(1)).unwrap();
        b.add(2, &config(2)).unwrap();
    }
    // Four rows of logits; key 2 reads row 3 and key 1 row 0.
    let logits: Vec<f32> = (0..32).map(|i| ((i * 7) % 11) as f32 / 3.0).collect();
    let rows = [3usize, 0];
    let picked: Vec<f32> = rows
        .iter()
        .flat_map(|&r| logits[r * 8..(r + 1) * 8].to_vec())
        .collect();
    for _ in 0..5 {
        let a = in_place.sample_rows(&logits, &rows, &[2, 1], None).unwrap();
        let b = copied.sample(&picked, &[2, 1], None).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.top_ids, b.top_ids);
        assert_eq!(
            a.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn named_rows_outside_the_logits_are_refused() {
    let mut batch = BatchSampler::new(8).unwrap();
    batch.add(1, &SamplerConfig::new(1)).unwrap();
    let logits = vec![0.5f32; 16];
    assert_eq!(
        batch
            .sample_rows(&logits, &[2], &[1], None)
            .unwrap_err()
            .to_string(),
        "logits row 2 named, but the logits hold 2 rows"
    );
    assert_eq!(
        batch
            .sample_rows(&logits, &[0, 1], &[1], None)
            .unwrap_err()
            .to_string(),
        "2 logits rows named for 1 keys; expected one per key"
    );
    assert!(matches!(
        batch.sample_rows(&logits[..12], &[0], &[1], None),
        Err(SamplerError::BatchShape(_))
    ));
    assert_eq!(batch.generated(1).unwrap(), 0);
}
