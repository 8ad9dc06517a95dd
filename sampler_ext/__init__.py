"""chatrpc's token sampler, in Rust.

:class:`BatchSampler` samples every sequence of a decode step in one call and keeps each
sequence's history and random stream on the Rust side; :class:`SequenceSampler` is the same
algorithm for one sequence at a time. For each token, in order:

0. ``mask`` (``BatchSampler`` only): tokens whose bit is clear are impossible;
1. ``logit_bias``: the bias of a token is added to its logit;
2. OpenAI's penalties over the tokens this sampler has produced or recorded (its history):
   ``logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``;
3. temperature: below 1e-5 (so 0 too) the choice is greedy, the highest logit with ties going to
   the lowest token id, and no random number is used; otherwise logits are divided by it;
4. ``top_p``: only the fewest most probable tokens whose probability reaches ``top_p`` are kept;
5. a draw from the sampler's own ChaCha20 stream seeded by ``seed``: the same seed and the same
   logits give the same tokens on every platform;

and then records the token in the history.

Logprobs are reported as OpenAI reports them: the log-softmax of the *raw* logits given to
``sample``, before the mask, logit bias, penalties, temperature and top-p (vLLM's default "raw
logprobs").
"""

from ._native import BatchSampler, DecodeInterrupt, SequenceSampler

__all__ = ["BatchSampler", "DecodeInterrupt", "SequenceSampler"]
