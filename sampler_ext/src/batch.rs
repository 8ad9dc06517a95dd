//! All the sequences of a decode step, sampled in one call.
//!
//! The sequences live here between steps (history, random stream), keyed by the caller's integer
//! key. A call reads one logits row per key, chooses every row first and applies the choices only
//! when all rows succeeded, so a bad row leaves every sequence as it was.

use std::collections::HashMap;

use crate::error::SamplerError;
use crate::params::{check_vocab_size, SamplerConfig};
use crate::sequence::Sequence;
use crate::step::{mask_words, Pending, Scratch};

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

/// The sequences of one model, and the scratch space their steps share.
#[derive(Debug, Default)]
pub struct BatchSampler {
    vocab_size: usize,
    sequences: HashMap<i64, Sequence>,
    scratch: Scratch,
}

impl BatchSampler {
    pub fn new(vocab_size: i64) -> Result<Self, SamplerError> {
        Ok(Self {
            vocab_size: check_vocab_size(vocab_size)?,
            sequences: HashMap::new(),
            scratch: Scratch::default(),
        })
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

    /// Registers a sequence over this sampler's vocabulary.
    pub fn add(&mut self, key: i64, config: &SamplerConfig) -> Result<(), SamplerError> {
        if self.sequences.contains_key(&key) {
            return Err(SamplerError::KeyExists(key));
        }
        self.sequences
            .insert(key, Sequence::new(self.vocab_size, config)?);
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
        let rows = keys.len();
        if logits.len() != rows * self.vocab_size {
            return Err(SamplerError::BatchShape(format!(
                "logits hold {} values, expected {rows} rows of {}",
                logits.len(),
                self.vocab_size
            )));
        }
        self.sample_rows(logits, &(0..rows).collect::<Vec<_>>(), keys, masks)
    }

    /// Samples row `rows[r]` of `logits` (any number of rows of `vocab_size`, row-major) for
    /// `keys[r]`, with mask row `r` if given: some rows of a decode step's logits, read where
    /// llama.cpp left them instead of copied out first. All or nothing, as `sample`.
    pub fn sample_rows(
        &mut self,
        logits: &[f32],
        rows: &[usize],
        keys: &[i64],
        masks: Option<&[u32]>,
    ) -> Result<BatchOutput, SamplerError> {
        self.check_batch(logits, rows, keys, masks)?;
        let (vocab, words) = (self.vocab_size, mask_words(self.vocab_size));
        let mut chosen: Vec<(Pending, Vec<(u32, f64)>)> = Vec::with_capacity(keys.len());
        for (row, (&key, &source_row)) in keys.iter().zip(rows).enumerate() {
            let row_logits = &logits[source_row * vocab..(source_row + 1) * vocab];
            let mask = masks.map(|m| &m[row * words..(row + 1) * words]);
            let pending = self.sequences[&key]
                .choose(row_logits, mask, &mut self.scratch)
                .map_err(|source| SamplerError::Row {
                    row,
                    key,
                    source: Box::new(source),
                })?;
            chosen.push((pending, self.scratch.top_logprobs.clone()));
        }
        let out = self.output(keys, &chosen);
        for (&key, (pending, _)) in keys.iter().zip(&chosen) {
            if let Some(sequence) = self.sequences.get_mut(&key) {
                sequence.commit(pending);
            }
        }
        Ok(out)
    }

    /// Refuses arrays whose sizes do not fit the keys, rows outside the logits, and unknown or
    /// repeated keys.
    fn check_batch(
        &self,
        logits: &[f32],
        rows: &[usize],
        keys: &[i64],
        masks: Option<&[u32]>,
    ) -> Result<(), SamplerError> {
        let (vocab, words) = (self.vocab_size, mask_words(self.vocab_size));
        if !logits.len().is_multiple_of(vocab) {
            return Err(SamplerError::BatchShape(format!(
                "logits hold {} values, not whole rows of {vocab}",
                logits.len()
            )));
        }
        let available = logits.len() / vocab;
        if rows.len() != keys.len() {
            return Err(SamplerError::BatchShape(format!(
                "{} logits rows named for {} keys; expected one per key",
                rows.len(),
                keys.len()
            )));
        }
        if let Some(&row) = rows.iter().find(|&&row| row >= available) {
            return Err(SamplerError::BatchShape(format!(
                "logits row {row} named, but the logits hold {available} rows"
            )));
        }
        if let Some(masks) = masks {
            if masks.len() != keys.len() * words {
                return Err(SamplerError::BatchShape(format!(
                    "masks hold {} words, expected {} rows of {words}",
                    masks.len(),
                    keys.len()
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
        Ok(())
    }

    /// The chosen rows as arrays, top logprobs padded to the largest `top_logprobs` of the rows.
    fn output(&self, keys: &[i64], chosen: &[(Pending, Vec<(u32, f64)>)]) -> BatchOutput {
        let rows = keys.len();
        let top_k = keys
            .iter()
            .map(|key| self.sequences[key].params.top_logprobs)
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
        out
    }
}

#[cfg(test)]
mod tests;
