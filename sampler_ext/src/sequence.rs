//! One sequence between steps: its checked parameters, its history (for the penalties) and its
//! random stream.

use crate::error::SamplerError;
use crate::params::{Params, SamplerConfig};
use crate::rng::SequenceRng;
use crate::step::{self, Pending, Scratch};

/// The tokens a sequence has generated so far, as counts for the penalties.
#[derive(Debug, Clone, Default)]
pub struct SequenceState {
    /// `(token, count)`, sorted by token, so that a step merges it with the sorted bias.
    counts: Vec<(u32, u32)>,
    generated: usize,
}

impl SequenceState {
    pub fn record(&mut self, token: u32) {
        match self.counts.binary_search_by_key(&token, |&(id, _)| id) {
            Ok(at) => self.counts[at].1 += 1,
            Err(at) => self.counts.insert(at, (token, 1)),
        }
        self.generated += 1;
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn count(&self, token: u32) -> u32 {
        self.counts
            .binary_search_by_key(&token, |&(id, _)| id)
            .map_or(0, |at| self.counts[at].1)
    }

    pub fn counts(&self) -> &[(u32, u32)] {
        &self.counts
    }
}

/// One sequence: its parameters, history and random stream. Steps read it; only
/// [`Sequence::commit`] changes it, so a failed step (or a failed row of a batch) changes nothing.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub params: Params,
    pub state: SequenceState,
    pub rng: SequenceRng,
}

impl Sequence {
    /// A sequence over `vocab_size` tokens (one [`crate::params::check_vocab_size`] accepted).
    pub fn new(vocab_size: usize, config: &SamplerConfig) -> Result<Self, SamplerError> {
        Ok(Self {
            params: Params::new(vocab_size, config)?,
            state: SequenceState::default(),
            rng: SequenceRng::new(config.seed),
        })
    }

    /// Stages 1 to 7 of [`crate::step`] on one row; changes nothing in the sequence.
    pub fn choose(
        &self,
        logits: &[f32],
        mask: Option<&[u32]>,
        scratch: &mut Scratch,
    ) -> Result<Pending, SamplerError> {
        step::choose(&self.params, &self.state, &self.rng, logits, mask, scratch)
    }

    /// Stage 8: applies a step's outcome.
    pub fn commit(&mut self, pending: &Pending) {
        if let Some(rng) = &pending.rng {
            self.rng = rng.clone();
        }
        self.state.record(pending.token);
    }

    /// Adds a token to the history without sampling (e.g. one forced by constrained decoding).
    pub fn record(&mut self, token: i64) -> Result<(), SamplerError> {
        let id = u32::try_from(token)
            .ok()
            .filter(|&id| (id as usize) < self.params.vocab_size)
            .ok_or(SamplerError::Token {
                token,
                vocab_size: self.params.vocab_size,
            })?;
        self.state.record(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
