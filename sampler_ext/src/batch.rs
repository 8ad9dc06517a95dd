//! All the sequences of a decode step, sampled in one call.
//!
//! The sequences live here between steps (history, random stream), keyed by the caller's integer
//! key. A call reads one logits row per key, chooses every row first and applies the choices only
//! when all rows succeeded, so a bad row leaves every sequence as it was.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::SamplerError;
use crate::sampler::{SamplerConfig, Sequence};
use crate::step::{mask_words, Cores, LogprobPrecision, Pending, Scratch, StepMode};

/// From this many logits in a batch (rows times vocabulary) rows are shared between this thread
/// and the helper; below, rows go one by one and only a large row's scan is shared (waking the
/// helper costs tens of microseconds, more than it saves on small batches).
const PARALLEL_MIN_LOGITS: usize = 2 * 100_000;

/// What one batch call returns, row by row.
#[derive(Debug, Clone, Default)]
pub struct BatchOutput {
    pub tokens: Vec<i32>,
    /// NaN for rows that asked for no logprobs.
    pub logprobs: Vec<f32>,
    /// `rows * top_k`, padded with -1 and NaN.
    pub top_ids: Vec<i32>,
    pub top_logprobs: Vec<f32>,
    /// The largest `top_logprobs` any row asked for.
    pub top_k: usize,
}

/// The sequences of one model and the scratch space of each worker thread.
#[derive(Debug, Default)]
pub struct BatchSampler {
    vocab_size: usize,
    sequences: HashMap<i64, Sequence>,
    scratch: Vec<Scratch>,
    /// Whether large rows and batches may use the helper thread (see `parallel.rs`).
    helper_thread: bool,
}

impl BatchSampler {
    pub fn new(vocab_size: i64) -> Result<Self, SamplerError> {
        // Validate the vocabulary size as a sequence would.
        let probe = SamplerConfig::new(vocab_size, 0);
        let vocab_size = crate::sampler::Params::new(&probe)?.vocab_size;
        Ok(Self {
            vocab_size,
            sequences: HashMap::new(),
            // One for this thread and one for the helper (see `parallel.rs`).
            scratch: vec![Scratch::default(), Scratch::default()],
            helper_thread: true,
        })
    }

    /// Off, every call runs on the calling thread alone (to measure what the helper brings, or
    /// where the caller keeps both cores busy itself).
    pub fn set_helper_thread(&mut self, on: bool) {
        self.helper_thread = on;
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    pub fn contains(&self, key: i64) -> bool {
        self.sequences.contains_key(&key)
    }

    pub fn generated(&self, key: i64) -> Result<usize, SamplerError> {
        Ok(self.get(key)?.state.generated())
    }

    fn get(&self, key: i64) -> Result<&Sequence, SamplerError> {
        self.sequences
            .get(&key)
            .ok_or(SamplerError::UnknownKey(key))
    }

    /// Registers a sequence; `config.vocab_size` must be this sampler's.
    pub fn add(&mut self, key: i64, config: &SamplerConfig) -> Result<(), SamplerError> {
        if self.sequences.contains_key(&key) {
            return Err(SamplerError::KeyExists(key));
        }
        let config = SamplerConfig {
            vocab_size: self.vocab_size as i64,
            ..config.clone()
        };
        self.sequences.insert(key, Sequence::new(&config)?);
        Ok(())
    }

    pub fn remove(&mut self, key: i64) {
        self.sequences.remove(&key);
    }

    pub fn record(&mut self, key: i64, token: i64) -> Result<(), SamplerError> {
        self.sequences
            .get_mut(&key)
            .ok_or(SamplerError::UnknownKey(key))?
            .record(token)
    }

    /// Samples row `r` of `logits` (`rows * vocab_size`, row-major) for `keys[r]`, with
    /// `masks` (`rows * ceil(vocab_size / 32)`) if given. All or nothing: on error no sequence
    /// changes.
    pub fn sample(
        &mut self,
        logits: &[f32],
        keys: &[i64],
        masks: Option<&[u32]>,
    ) -> Result<BatchOutput, SamplerError> {
        let (rows, vocab, words) = (keys.len(), self.vocab_size, mask_words(self.vocab_size));
        if logits.len() != rows * vocab {
            return Err(SamplerError::BatchShape(format!(
                "logits hold {} values, expected {rows} rows of {vocab}",
                logits.len()
            )));
        }
        if let Some(masks) = masks {
            if masks.len() != rows * words {
                return Err(SamplerError::BatchShape(format!(
                    "masks hold {} words, expected {rows} rows of {words}",
                    masks.len()
                )));
            }
        }
        for (row, &key) in keys.iter().enumerate() {
            let row_error = |source| SamplerError::Row {
                row,
                key,
                source: Box::new(source),
            };
            if !self.sequences.contains_key(&key) {
                return Err(row_error(SamplerError::UnknownKey(key)));
            }
            if keys[..row].contains(&key) {
                return Err(row_error(SamplerError::KeyRepeated(key)));
            }
        }

        let sequences = &self.sequences;
        let choose_row = |row: usize, scratch: &mut Scratch, cores: Cores| {
            let key = keys[row];
            let sequence = &sequences[&key];
            let row_logits = &logits[row * vocab..(row + 1) * vocab];
            let mask = masks.map(|m| &m[row * words..(row + 1) * words]);
            sequence
                .choose(
                    row_logits,
                    mask,
                    scratch,
                    StepMode {
                        precision: LogprobPrecision::Fast,
                        cores,
                    },
                )
                .map(|pending| (pending, scratch.top_logprobs.clone()))
                .map_err(|source| SamplerError::Row {
                    row,
                    key,
                    source: Box::new(source),
                })
        };
        let results: Vec<Result<_, SamplerError>> = if self.helper_thread
            && rows > 1
            && rows * vocab >= PARALLEL_MIN_LOGITS
            && crate::parallel::available()
        {
            // Rows handed out one at a time to this thread and the helper, each with its own
            // scratch, so that a helper that wakes late just takes fewer rows.
            let next = AtomicUsize::new(0);
            let scratches = Mutex::new(self.scratch.iter_mut().collect::<Vec<_>>());
            let done = Mutex::new(Vec::with_capacity(rows));
            crate::parallel::on_both(|| {
                let Some(scratch) = scratches.lock().ok().and_then(|mut s| s.pop()) else {
                    return;
                };
                loop {
                    let row = next.fetch_add(1, Ordering::Relaxed);
                    if row >= rows {
                        break;
                    }
                    let result = choose_row(row, scratch, Cores::One);
                    if let Ok(mut done) = done.lock() {
                        done.push((row, result));
                    }
                }
            });
            let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
            done.sort_unstable_by_key(|&(row, _)| row);
            done.into_iter().map(|(_, result)| result).collect()
        } else {
            // One row, or rows too small to share: each large row shares its own scan.
            let cores = if self.helper_thread {
                Cores::Both
            } else {
                Cores::One
            };
            (0..rows)
                .map(|row| choose_row(row, &mut self.scratch[0], cores))
                .collect()
        };
        let chosen: Vec<(Pending, Vec<(u32, f64)>)> =
            results.into_iter().collect::<Result<_, _>>()?;

        let top_k = keys
            .iter()
            .map(|key| sequences[key].params.top_logprobs)
            .max()
            .unwrap_or(0);
        let mut out = BatchOutput {
            tokens: Vec::with_capacity(rows),
            logprobs: Vec::with_capacity(rows),
            top_ids: vec![-1; rows * top_k],
            top_logprobs: vec![f32::NAN; rows * top_k],
            top_k,
        };
        for (row, (pending, top)) in chosen.iter().enumerate() {
            out.tokens.push(pending.token as i32);
            out.logprobs.push(pending.logprob as f32);
            for (i, &(id, logprob)) in top.iter().enumerate() {
                out.top_ids[row * top_k + i] = id as i32;
                out.top_logprobs[row * top_k + i] = logprob as f32;
            }
        }
        for (&key, (pending, _)) in keys.iter().zip(&chosen) {
            if let Some(sequence) = self.sequences.get_mut(&key) {
                sequence.commit(pending);
            }
        }
        Ok(out)
    }
}
