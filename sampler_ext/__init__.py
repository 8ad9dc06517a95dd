"""chatrpc's token sampler, in Rust.

:class:`BatchSampler` samples every sequence of a decode step in one call and keeps each
sequence's parameters, history (for the penalties) and random stream on the Rust side, under the
caller's integer key; :meth:`BatchSampler.sample` returns a :class:`Sampled`, the chosen tokens and
their logprobs row by row. :class:`DecodeInterrupt` is a flag that stops a running ``llama_decode``.

What a step does — the mask, logit bias, OpenAI's frequency and presence penalties, temperature
(greedy below 1e-5), top-p and a draw from the sequence's own ChaCha20 stream — is listed once,
numbered in the order it runs, at the top of ``sampler_ext/src/step.rs``. The same seed and the
same logits give the same tokens on every platform.

Logprobs are reported as OpenAI reports them: the log-softmax of the *raw* logits given to
``sample``, before the mask, logit bias, penalties, temperature and top-p (vLLM's default "raw
logprobs").
"""

from ._native import BatchSampler, DecodeInterrupt, Sampled

__all__ = ["BatchSampler", "DecodeInterrupt", "Sampled"]
