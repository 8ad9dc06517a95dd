//! chatrpc's token sampler as a Python extension module, `sampler_ext._native`.
//!
//! Two layers. The sampler is plain Rust over `&[f32]`: [`batch::BatchSampler`] keeps the
//! sequences and samples a decode step's rows, each row one run of the stages listed, numbered,
//! in [`step`]. This file is the other layer: it converts Python arguments, releases the GIL around
//! the numeric work and turns [`SamplerError`] into `ValueError`.

mod adjust;
pub mod batch;
mod draw;
pub mod error;
pub mod interrupt;
pub mod kernels;
mod logprobs;
mod nucleus;
pub mod params;
pub mod rng;
mod scan;
pub mod sequence;
pub mod step;
#[cfg(test)]
mod test_inputs;

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt};

pub use batch::{BatchOutput, BatchSampler};
pub use error::SamplerError;
pub use interrupt::DecodeInterrupt;
pub use params::SamplerConfig;

/// What `BatchSampler.sample` chose, row by row: the arrays of a [`BatchOutput`], handed to
/// Python as they are.
#[pyclass(name = "Sampled", module = "sampler_ext._native", frozen)]
pub struct PySampled {
    /// `int32[rows]`: the chosen token of each row.
    #[pyo3(get)]
    tokens: Py<PyArray1<i32>>,
    /// `float32[rows]`: the raw logprob of each chosen token, NaN where the row asked for none.
    #[pyo3(get)]
    logprobs: Py<PyArray1<f32>>,
    /// `int32[rows, k]`: the `k` most likely tokens of each row, padded with -1.
    #[pyo3(get)]
    top_ids: Py<PyArray2<i32>>,
    /// `float32[rows, k]`: their raw logprobs, padded with NaN.
    #[pyo3(get)]
    top_logprobs: Py<PyArray2<f32>>,
}

impl PySampled {
    fn new(py: Python<'_>, out: BatchOutput) -> PyResult<Self> {
        let (rows, k) = (out.tokens.len(), out.top_k);
        Ok(Self {
            tokens: out.tokens.into_pyarray(py).unbind(),
            logprobs: out.logprobs.into_pyarray(py).unbind(),
            top_ids: out.top_ids.into_pyarray(py).reshape([rows, k])?.unbind(),
            top_logprobs: out
                .top_logprobs
                .into_pyarray(py)
                .reshape([rows, k])?
                .unbind(),
        })
    }
}

#[pymethods]
impl PySampled {
    fn __repr__(&self, py: Python<'_>) -> String {
        let [rows, k] = *self.top_ids.bind(py).shape() else {
            unreachable!("top_ids has two dimensions")
        };
        format!("Sampled(rows={rows}, top_logprobs={k})")
    }
}

/// Samples every sequence of a decode step in one call; the sequences (history, random stream)
/// live on the Rust side between steps, under the caller's integer keys.
///
/// Logprobs are the log-softmax of the raw logits, before mask, bias, penalties, temperature and
/// top-p.
#[pyclass(name = "BatchSampler", module = "sampler_ext._native")]
pub struct PyBatchSampler {
    inner: BatchSampler,
}

#[pymethods]
impl PyBatchSampler {
    #[new]
    fn new(vocab_size: &Bound<'_, PyAny>) -> PyResult<Self> {
        let inner = BatchSampler::new(extract_int(vocab_size, "vocab_size")?)?;
        Ok(Self { inner })
    }

    #[pyo3(signature = (
        key, *, seed, temperature = 1.0, top_p = 1.0, frequency_penalty = 0.0,
        presence_penalty = 0.0, logit_bias = None, top_logprobs = None, logprobs = false,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        key: &Bound<'_, PyAny>,
        seed: &Bound<'_, PyAny>,
        temperature: f64,
        top_p: f64,
        frequency_penalty: f64,
        presence_penalty: f64,
        logit_bias: Option<&Bound<'_, PyDict>>,
        top_logprobs: Option<&Bound<'_, PyAny>>,
        logprobs: bool,
    ) -> PyResult<()> {
        let config = SamplerConfig {
            seed: extract_seed(seed)?,
            temperature,
            top_p,
            frequency_penalty,
            presence_penalty,
            logit_bias: extract_bias(logit_bias)?,
            top_logprobs: match top_logprobs {
                Some(k) => extract_int(k, "top_logprobs")?,
                None => 0,
            },
            logprobs,
        };
        self.inner.add(extract_int(key, "key")?, &config)?;
        Ok(())
    }

    fn remove(&mut self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.remove(extract_int(key, "key")?);
        Ok(())
    }

    fn record(&mut self, key: &Bound<'_, PyAny>, token: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner
            .record(extract_int(key, "key")?, extract_int(token, "token id")?)?;
        Ok(())
    }

    /// How many tokens are in a sequence's history.
    fn generated(&self, key: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.inner.generated(extract_int(key, "key")?)?)
    }

    /// Row `r` of the draw: `keys[r]` samples logits row `rows[r]` (default `r`: the logits hold
    /// one row per key), with mask row `r` if given.
    #[pyo3(signature = (logits, keys, masks = None, rows = None))]
    fn sample<'py>(
        &mut self,
        py: Python<'py>,
        logits: PyReadonlyArray2<'py, f32>,
        keys: &Bound<'py, PyAny>,
        masks: Option<PyReadonlyArray2<'py, u32>>,
        rows: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<PySampled> {
        let keys: Vec<i64> = match keys.extract::<PyReadonlyArray1<'py, i64>>() {
            Ok(array) => array.as_array().to_vec(),
            Err(_) => keys.extract()?,
        };
        let [available, columns] = logits.shape() else {
            unreachable!("a 2-D array has two dimensions")
        };
        let (available, columns) = (*available, *columns);
        if columns != self.inner.vocab_size() || (rows.is_none() && available != keys.len()) {
            return Err(SamplerError::BatchShape(format!(
                "logits have shape ({available}, {columns}); expected ({}, {}): one row of vocab_size per key{}",
                keys.len(),
                self.inner.vocab_size(),
                if rows.is_none() { "" } else { " (or any number of rows, with `rows` naming one per key)" }
            ))
            .into());
        }
        // The core checks named rows against the keys and the logits.
        let rows: Vec<usize> = match rows {
            None => (0..keys.len()).collect(),
            Some(rows) => match rows.extract::<PyReadonlyArray1<'py, i64>>() {
                Ok(array) => row_indices(array.as_array().iter().copied())?,
                Err(_) => row_indices(rows.extract::<Vec<i64>>()?)?,
            },
        };
        let logits = logits.as_slice().map_err(|_| SamplerError::NotContiguous)?;
        let masks = match &masks {
            Some(m) => Some(m.as_slice().map_err(|_| SamplerError::NotContiguous)?),
            None => None,
        };
        let inner = &mut self.inner;
        let out = py.detach(|| inner.sample_rows(logits, &rows, &keys, masks))?;
        PySampled::new(py, out)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, key: &Bound<'_, PyAny>) -> bool {
        extract_int(key, "key").is_ok_and(|key| self.inner.contains(key))
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!(
            "BatchSampler(vocab_size={}, sequences={})",
            self.inner.vocab_size(),
            self.inner.len()
        )
    }
}

/// Logits row numbers; a negative one is a `ValueError`.
fn row_indices(rows: impl IntoIterator<Item = i64>) -> PyResult<Vec<usize>> {
    rows.into_iter()
        .map(|row| {
            usize::try_from(row).map_err(|_| {
                SamplerError::BatchShape(format!("logits row {row} named; rows are counted from 0"))
                    .into()
            })
        })
        .collect()
}

fn extract_bias(logit_bias: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(i64, f64)>> {
    let mut bias = Vec::new();
    if let Some(dict) = logit_bias {
        bias.reserve(dict.len());
        for (token, value) in dict.iter() {
            bias.push((
                extract_int(&token, "logit_bias token id")?,
                value.extract::<f64>()?,
            ));
        }
    }
    Ok(bias)
}

/// An integer argument as `i64`; a Python int too large for it is a `ValueError` (out of range),
/// anything that is not an int keeps pyo3's `TypeError`.
fn extract_int(value: &Bound<'_, PyAny>, what: &'static str) -> PyResult<i64> {
    value.extract::<i64>().map_err(|err| {
        if value.is_instance_of::<PyInt>() {
            SamplerError::IntegerOutOfRange {
                what,
                value: value.to_string(),
            }
            .into()
        } else {
            err
        }
    })
}

/// The gRPC seed is `int64`, OpenAI's is any integer: take `[-2**63, 2**64)` modulo 2**64.
fn extract_seed(seed: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(seed) = seed.extract::<u64>() {
        return Ok(seed);
    }
    match seed.extract::<i64>() {
        Ok(seed) => Ok(seed as u64),
        Err(_) if seed.is_instance_of::<PyInt>() => Err(SamplerError::Seed.into()),
        Err(err) => Err(err),
    }
}

/// A flag that stops a running `llama_decode` early: pass `callback` and `data` to
/// `llama_set_abort_callback`, then `raise_()` it from any thread (interrupt.rs says why in Rust).
#[pyclass(name = "DecodeInterrupt", module = "sampler_ext._native", frozen)]
pub struct PyDecodeInterrupt {
    inner: DecodeInterrupt,
}

#[pymethods]
impl PyDecodeInterrupt {
    #[new]
    fn new() -> Self {
        Self {
            inner: DecodeInterrupt::new(),
        }
    }

    /// Ask the decode that is running (or the next one) to stop.
    fn raise_(&self) {
        self.inner.raise();
    }

    fn clear(&self) {
        self.inner.clear();
    }

    #[getter]
    fn is_raised(&self) -> bool {
        self.inner.is_raised()
    }

    /// The address of the C function `bool (*)(void *)` that reads the flag.
    #[getter]
    fn callback(&self) -> usize {
        DecodeInterrupt::callback_address()
    }

    /// The address of the flag itself, the callback's `data`; valid while this object lives.
    #[getter]
    fn data(&self) -> usize {
        self.inner.data_address()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBatchSampler>()?;
    m.add_class::<PySampled>()?;
    m.add_class::<PyDecodeInterrupt>()?;
    Ok(())
}
