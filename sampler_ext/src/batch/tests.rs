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
