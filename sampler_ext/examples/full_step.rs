//! The benchmark's cases on the captured Gemma logits, in Rust alone (no Python), for profiling:
//! `cargo run --release --example full_step -- [full|greedy|greedy+top20|full+top20] [steps]`
use _native::batch::BatchSampler;
use _native::params::SamplerConfig;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let case = args.get(1).map_or("full", |s| s.as_str()).to_string();
    let steps: usize = args.get(2).map_or(4000, |s| s.parse().unwrap());
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../benchmarks/data/gemma3_logits.npy"
    );
    let bytes = std::fs::read(path).expect("run benchmarks/capture_logits.py first");
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize + 10;
    let logits: Vec<f32> = bytes[header..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let vocab = 262_144usize;
    let rows = logits.len() / vocab;
    let mut config = SamplerConfig::new(0);
    if case.starts_with("greedy") {
        config.temperature = 0.0;
    } else {
        config.temperature = 0.8;
        config.top_p = 0.9;
        config.frequency_penalty = 0.5;
        config.presence_penalty = 0.5;
        // 300 biased tokens spread over the vocabulary, as the Python benchmark.
        config.logit_bias = (0..300)
            .map(|i| ((i * 7_919 + 13) % vocab) as i64)
            .map(|t| (t, ((t % 10) as f64) - 5.0))
            .collect();
        config.logit_bias.sort_by_key(|&(t, _)| t);
    }
    if case.ends_with("top20") {
        config.top_logprobs = 20;
        config.logprobs = true;
    }
    let mut sampler = BatchSampler::new(vocab as i64).unwrap();
    sampler.add(0, &config).unwrap();
    for i in 0..500 {
        sampler.record(0, ((i * 104_729) % vocab) as i64).unwrap();
    }
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let row = &logits[(s % rows) * vocab..(s % rows + 1) * vocab];
        let t = Instant::now();
        sampler.sample(row, &[0], None).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{case}: median {:.1} us, p10 {:.1}, p90 {:.1}",
        times[steps / 2] * 1e6,
        times[steps / 10] * 1e6,
        times[steps * 9 / 10] * 1e6
    );
}
