"""Type stubs for the compiled module ``sampler_ext._native``; ``sampler_ext`` says where the algorithm is listed."""

import numpy
import numpy.typing

class Sampled:
    """What :meth:`BatchSampler.sample` chose, one row per key, in the order of the keys.

    Read-only attributes; each is a new numpy array that belongs to the caller. ``k`` is the
    largest ``top_logprobs`` among the rows' sequences (0 when none asked for any).
    """

    @property
    def tokens(self) -> numpy.typing.NDArray[numpy.int32]:
        """``int32[rows]``: the chosen token of each row."""
    @property
    def logprobs(self) -> numpy.typing.NDArray[numpy.float32]:
        """``float32[rows]``: the raw logprob of each chosen token; NaN for rows whose sequence asked
        for no logprobs."""
    @property
    def top_ids(self) -> numpy.typing.NDArray[numpy.int32]:
        """``int32[rows, k]``: each row's ``min(top_logprobs, vocab_size)`` most likely tokens, most
        likely first, ties by lower id, padded with -1."""
    @property
    def top_logprobs(self) -> numpy.typing.NDArray[numpy.float32]:
        """``float32[rows, k]``: the raw logprobs of ``top_ids``, padded with NaN. A logprob is
        ``-inf`` for a token whose logit was ``-inf``."""

class BatchSampler:
    """Samples every sequence of a decode step in one call.

    Each sequence is registered under an integer key with :meth:`add` and lives on the Rust side
    (parameters, history for the penalties, ChaCha20 stream) until :meth:`remove`.

    Logprobs, everywhere, are the log-softmax of the raw logits passed to :meth:`sample`, before
    the mask, logit bias, penalties, temperature and top-p, as OpenAI reports them. They are
    float32, and their normaliser is summed with a fast float32 pass (within about 1e-6 of the
    exact value).

    Every invalid argument raises ``ValueError`` (``TypeError`` for a wrong type); a failed call
    changes nothing, so the sampler can be used again.
    """

    def __init__(self, vocab_size: int) -> None:
        """``vocab_size`` in ``[1, 2**31 - 1]``: every logits row has this many columns."""

    def add(
        self,
        key: int,
        *,
        seed: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        top_logprobs: int = 0,
        logprobs: bool = False,
    ) -> None:
        """Registers a sequence under ``key``.

        Args:
            key: any int64.
            seed: any int in ``[-2**63, 2**64)``; negative values are taken modulo ``2**64`` (the
                gRPC seed is int64), so ``-1`` and ``2**64 - 1`` give the same stream.
            temperature: in ``[0, 2]``; below ``1e-5`` the choice is greedy (argmax, lowest id on
                ties) and no random number is drawn.
            top_p: in ``(0, 1]``; the nucleus always keeps at least one token.
            frequency_penalty: in ``[-2, 2]``, times how often a token is in the history.
            presence_penalty: in ``[-2, 2]``, once for any token in the history.
            logit_bias: token id in ``[0, vocab_size)`` -> bias, a finite float in ``[-100, 100]``.
            top_logprobs: in ``[0, 20]``, how many of the most likely tokens ``sample`` reports.
            logprobs: whether ``sample`` reports the chosen token's logprob (it also does whenever
                ``top_logprobs > 0``).

        Raises:
            ValueError: the key is already registered, or a parameter is out of range.
        """

    def remove(self, key: int) -> None:
        """Forgets a sequence; no error if the key is not registered."""

    def record(self, key: int, token: int) -> None:
        """Adds ``token`` to the sequence's history without sampling (e.g. a token forced by
        constrained decoding), so that penalties count it. ``ValueError`` for an unknown key or a
        token out of range."""

    def generated(self, key: int) -> int:
        """How many tokens are in the sequence's history, sampled or recorded. ``ValueError`` for an
        unknown key."""

    def sample(
        self,
        logits: numpy.typing.NDArray[numpy.float32],
        keys: numpy.typing.NDArray[numpy.int64] | list[int],
        masks: numpy.typing.NDArray[numpy.uint32] | None = None,
        rows: numpy.typing.NDArray[numpy.int64] | list[int] | None = None,
    ) -> Sampled:
        """Chooses the next token of every row's sequence and records it in that sequence.

        Args:
            logits: C-contiguous float32 ``(rows, vocab_size)``; only read, never written (it may be
                llama.cpp's own memory), and read with the GIL released (do not write to it from
                another thread meanwhile). ``-inf`` marks an impossible token; NaN and ``+inf``
                are refused, and so is a row in which every token is impossible.
            keys: one registered key per row, no key twice.
            masks: optional C-contiguous uint32 ``(rows, ceil(vocab_size / 32))``: bit ``j % 32``
                of word ``j // 32`` set means token ``j`` is allowed (the llguidance / xgrammar
                layout). Applied before bias and penalties; a row of all ones is unconstrained.
            rows: optional, one per key: row ``r`` samples ``logits[rows[r]]`` instead of
                ``logits[r]``, and ``logits`` may hold any number of rows. Some rows of a decode
                step's logits are so sampled where they are, not copied out first. A masks row
                still goes with each key.

        Returns:
            The tokens and logprobs of the rows, in the order of ``keys``.

        Raises:
            ValueError: shapes that do not fit, a non-contiguous array, an unknown or repeated key,
                or a bad row (NaN or +inf logit, all ``-inf``, a mask that allows no possible
                token); the message names the row and its key. No sequence changes when any row
                fails.
            TypeError: arrays of the wrong dtype or number of dimensions.
        """

    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...
    @property
    def vocab_size(self) -> int: ...

class DecodeInterrupt:
    """A flag that stops a running ``llama_decode`` early.

    Pass :attr:`callback` and :attr:`data` to ``llama_set_abort_callback``: llama.cpp then calls
    the C function at ``callback`` with ``data`` between the nodes of every graph it computes, on
    the decoding thread and without the GIL, and stops (``llama_decode`` returns 2) once the flag
    is raised. :meth:`raise_` and :meth:`clear` may be called from any thread.
    """

    def __init__(self) -> None: ...
    def raise_(self) -> None: ...
    def clear(self) -> None: ...
    @property
    def is_raised(self) -> bool: ...
    @property
    def callback(self) -> int:
        """The address of ``bool interrupt_requested(void *data)``."""
    @property
    def data(self) -> int:
        """The address of the flag; valid while this object lives."""
