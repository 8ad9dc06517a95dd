//! The one error type of the sampler; every failure that input can cause is one of these.

use std::fmt;

use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

/// What went wrong, in terms a caller of the Python API can act on.
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerError {
    /// `vocab_size` was not in `1..=i32::MAX`.
    VocabSize(i64),
    /// A sampling parameter was outside its allowed range.
    Parameter {
        name: &'static str,
        value: f64,
        allowed: &'static str,
    },
    /// `top_logprobs` was outside `0..=20`.
    TopLogprobs(i64),
    /// A `logit_bias` key was not a token id of this vocabulary.
    BiasToken { token: i64, vocab_size: usize },
    /// A `logit_bias` value was non-finite or outside `[-100, 100]`.
    BiasValue { token: i64, bias: f64 },
    /// A token passed to `record` was not a token id of this vocabulary.
    Token { token: i64, vocab_size: usize },
    /// A Python int argument did not fit in 64 bits.
    IntegerOutOfRange { what: &'static str, value: String },
    /// The seed was not in `[-2**63, 2**64)`.
    Seed,
    /// The logits array did not have `vocab_size` entries.
    Length { expected: usize, got: usize },
    /// The logits array was not C-contiguous (or misaligned), so it cannot be read in place.
    NotContiguous,
    /// A logit was NaN or +inf.
    NonFiniteLogit { token: usize, value: f32 },
    /// Every token had a logit of -inf, so there was nothing to choose.
    AllImpossible,
    /// A `logit_bias` token id appeared twice.
    BiasRepeated(i64),
    /// A mask row did not have `ceil(vocab_size / 32)` words.
    MaskLength { expected: usize, got: usize },
    /// The mask allowed no token with a finite logit.
    NothingAllowed,
    /// `add` with a key that is already registered.
    KeyExists(i64),
    /// A key that is not registered.
    UnknownKey(i64),
    /// The same key on two rows of one batch.
    KeyRepeated(i64),
    /// The arrays of a batch did not fit together.
    BatchShape(String),
    /// One row of a batch failed; no row was applied.
    Row {
        row: usize,
        key: i64,
        source: Box<SamplerError>,
    },
}

impl fmt::Display for SamplerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VocabSize(v) => write!(f, "vocab_size must be in [1, 2147483647], got {v}"),
            Self::Parameter { name, value, allowed } => {
                write!(f, "{name} must be {allowed}, got {value}")
            }
            Self::TopLogprobs(k) => write!(f, "top_logprobs must be in [0, 20], got {k}"),
            Self::BiasToken { token, vocab_size } => write!(
                f,
                "logit_bias token id {token} is out of range for a vocabulary of {vocab_size} tokens"
            ),
            Self::BiasValue { token, bias } => write!(
                f,
                "logit_bias for token {token} must be a finite number in [-100, 100], got {bias}"
            ),
            Self::Token { token, vocab_size } => write!(
                f,
                "token id {token} is out of range for a vocabulary of {vocab_size} tokens"
            ),
            Self::IntegerOutOfRange { what, value } => write!(f, "{what} {value} is out of range"),
            Self::Seed => write!(f, "seed must be an integer in [-2**63, 2**64)"),
            Self::Length { expected, got } => {
                write!(f, "expected {expected} logits (the vocabulary size), got {got}")
            }
            Self::NotContiguous => write!(
                f,
                "logits must be a C-contiguous, aligned float32 array (use numpy.ascontiguousarray)"
            ),
            Self::NonFiniteLogit { token, value } => {
                write!(f, "logit of token {token} is {value}; logits must not be NaN or +inf")
            }
            Self::AllImpossible => write!(f, "every token has a logit of -inf; nothing can be sampled"),
            Self::BiasRepeated(token) => write!(f, "logit_bias names token {token} twice"),
            Self::MaskLength { expected, got } => {
                write!(f, "expected a mask of {expected} uint32 words (ceil(vocab_size / 32)), got {got}")
            }
            Self::NothingAllowed => {
                write!(f, "the mask allows no token with a finite logit; nothing can be sampled")
            }
            Self::KeyExists(key) => write!(f, "key {key} is already registered"),
            Self::UnknownKey(key) => write!(f, "key {key} is not registered"),
            Self::KeyRepeated(key) => write!(f, "key {key} appears on more than one row"),
            Self::BatchShape(message) => f.write_str(message),
            Self::Row { row, key, source } => write!(f, "row {row} (key {key}): {source}"),
        }
    }
}

impl std::error::Error for SamplerError {}

impl From<SamplerError> for PyErr {
    fn from(err: SamplerError) -> PyErr {
        PyValueError::new_err(err.to_string())
    }
}
