"""Type stubs for the compiled module ``sampler_ext._native``; see ``sampler_ext`` for the algorithm."""

import numpy
import numpy.typing

class SequenceSampler:
    """Samples the tokens of one sequence and keeps its history for the penalties.

    Logprobs, everywhere, are the log-softmax of the raw logits passed to :meth:`sample`, before
    logit bias, penalties, temperature and top-p, as OpenAI reports them.

    Every invalid argument raises ``ValueError`` (``TypeError`` for a wrong type), at construction
    for the parameters and in :meth:`sample` for the logits; a failed call changes nothing, so the
    sampler can be used again.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        seed: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        top_logprobs: int = 0,
    ) -> None:
        """
        Args:
            vocab_size: number of logits ``sample`` expects, in ``[1, 2**31 - 1]``.
            seed: any int in ``[-2**63, 2**64)``; negative values are taken modulo ``2**64`` (the
                gRPC seed is int64), so ``-1`` and ``2**64 - 1`` give the same stream.
            temperature: in ``[0, 2]``; below ``1e-5`` the choice is greedy (argmax, lowest id on
                ties) and no random number is drawn.
            top_p: in ``(0, 1]``; the nucleus always keeps at least one token.
            frequency_penalty: in ``[-2, 2]``, times how often a token is in the history.
            presence_penalty: in ``[-2, 2]``, once for any token in the history.
            logit_bias: token id in ``[0, vocab_size)`` -> bias, a finite float in ``[-100, 100]``.
            top_logprobs: in ``[0, 20]``, how many of the most likely tokens ``sample`` reports.
        """

    def sample(self, logits: numpy.typing.NDArray[numpy.float32]) -> tuple[int, float, list[tuple[int, float]]]:
        """Chooses the next token and records it in the history.

        Args:
            logits: 1-D, C-contiguous float32 array of ``vocab_size`` logits; only read, never
                written, and read with the GIL released (do not write to it from another thread
                meanwhile). ``-inf`` marks an impossible token; NaN and ``+inf`` are refused, and
                so are arrays in which every token is impossible.

        Returns:
            ``(token, logprob, top_logprobs)``: the chosen token id, its raw logprob, and the
            ``min(top_logprobs, vocab_size)`` most likely tokens as ``(token id, raw logprob)``,
            most likely first, ties by lower id. A logprob is ``-inf`` for a token whose logit was
            ``-inf`` (possible in ``top_logprobs`` only when few tokens are possible).

        Raises:
            ValueError: wrong length, non-contiguous array, a NaN or ``+inf`` logit, or all ``-inf``.
            TypeError: not a 1-D float32 numpy array.
        """

    def record(self, token: int) -> None:
        """Adds ``token`` to the history without sampling (e.g. a token forced by constrained
        decoding), so that penalties count it. ``ValueError`` unless ``0 <= token < vocab_size``."""

    @property
    def generated(self) -> int:
        """How many tokens are in the history, sampled or recorded."""

    @property
    def vocab_size(self) -> int:
        """The number of logits ``sample`` expects."""

class BatchSampler:
    """Samples every sequence of a decode step in one call.

    Each sequence is registered under an integer key with :meth:`add` and lives on the Rust side
    (parameters, history for the penalties, ChaCha20 stream) until :meth:`remove`. For the same
    seed, parameters and logits it chooses exactly the tokens a :class:`SequenceSampler` would.

    Logprobs, everywhere, are the log-softmax of the raw logits passed to :meth:`sample`, before
    the mask, logit bias, penalties, temperature and top-p, as OpenAI reports them. They are
    float32, and summed with a fast float32 pass (within about 1e-6 of the exact value).
    """

    def __init__(self, vocab_size: int, *, helper_thread: bool = True) -> None:
        """``vocab_size`` in ``[1, 2**31 - 1]``: every logits row has this many columns.

        With ``helper_thread`` (the default) a row of at least 100,000 logits, or a batch of at
        least 200,000, is shared with one helper thread; off, every call runs on the calling thread
        alone. The tokens are the same either way."""

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
        """Registers a sequence under ``key`` (any int64). The parameters are those of
        :class:`SequenceSampler`; ``logprobs`` asks for the chosen token's logprob (it is also
        computed whenever ``top_logprobs > 0``).

        Raises:
            ValueError: the key is already registered, or a parameter is out of range.
        """

    def remove(self, key: int) -> None:
        """Forgets a sequence; no error if the key is not registered."""

    def record(self, key: int, token: int) -> None:
        """Adds ``token`` to the sequence's history without sampling (e.g. a token forced by
        constrained decoding). ``ValueError`` for an unknown key or a token out of range."""

    def generated(self, key: int) -> int:
        """How many tokens are in the sequence's history. ``ValueError`` for an unknown key."""

    def sample(
        self,
        logits: numpy.typing.NDArray[numpy.float32],
        keys: numpy.typing.NDArray[numpy.int64] | list[int],
        masks: numpy.typing.NDArray[numpy.uint32] | None = None,
    ) -> tuple[
        numpy.typing.NDArray[numpy.int32],
        numpy.typing.NDArray[numpy.float32],
        numpy.typing.NDArray[numpy.int32],
        numpy.typing.NDArray[numpy.float32],
    ]:
        """Chooses the next token of every row's sequence and records it in that sequence.

        Args:
            logits: C-contiguous float32 ``(rows, vocab_size)``; only read (it may be llama.cpp's
                own memory), with the GIL released.
            keys: one registered key per row, no key twice.
            masks: optional C-contiguous uint32 ``(rows, ceil(vocab_size / 32))``: bit ``j % 32``
                of word ``j // 32`` set means token ``j`` is allowed (the llguidance / xgrammar
                layout). Applied before bias and penalties; a row of all ones is unconstrained.

        Returns:
            ``(tokens, logprobs, top_ids, top_logprobs)``: ``int32[rows]``; ``float32[rows]``, the
            raw logprob of each chosen token (NaN for rows that asked for no logprobs);
            ``int32[rows, K]`` and ``float32[rows, K]`` with ``K`` the largest ``top_logprobs``
            of the rows, most likely first, ties by lower id, padded with -1 and NaN.

        Raises:
            ValueError: shapes that do not fit, an unknown or repeated key, or a bad row (NaN or
                +inf logit, all ``-inf``, a mask that allows no possible token); the message names
                the row and its key. No sequence changes when any row fails.
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
