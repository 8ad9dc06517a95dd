"""A GGUF model loaded through llama.cpp's C API: weights, vocabulary, context and chat template.

One context serves every sequence of the model: its KV cache holds `max_sequences` separate
streams of `context_per_sequence` tokens each. Only the scheduler thread touches the context;
tokenization and the token table only read the vocabulary and are safe from any thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import llama_cpp

from service.chat_template import ChatTemplate
from service.engine.openmp import usable_cpus
from service.engine_settings import EngineSettings
from service.tool_calls import ToolSpec, messages_for_builtin_format

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False
_kernels_pinned: bool | None = None  # the `deterministic` every model of this process was loaded with

# llama.cpp's CPU backend multiplies by K-quant weights (the embedded model's attn_output and
# ffn_down) with a tiled kernel once a batch has 8 rows or more, and with a dot-product kernel below
# that. They round differently, so a sequence's logits would depend on how many others share its
# decode step (benchmarks/determinism.py measures by how much). With this variable at 0 every batch
# size takes the dot-product kernel. llama.cpp reads it once per process, at its first matrix
# product, so the choice holds for the whole process.
_TILED_MATMUL_ENV = "GGML_CPU_TILED_MM"

# ggml.h's GGML_TYPE_BF16 (llama_cpp does not export it). llama.cpp's CPU flash attention has three
# paths: a query row alone over the whole KV (what a decode step of several sequences takes), a
# split-KV path for one sequence decoding one row alone with 512 cached positions or more, and a
# tiled path for 64 query rows of a sequence or more (prompt chunks). They round differently. The
# other two are taken only when K and V are cached in the same type, F16 or F32, so with V cached as
# BF16 every row takes the first: a row's logits then depend on nothing but its own tokens, not on
# the rows beside it, the chunk that computed its KV, or whether a guess is checked with it
# (benchmarks/determinism.py checks each of these). BF16 is F16's size; V keeps 8 significant bits
# instead of 11.
GGML_TYPE_BF16 = 30

# ggml_log_level (ggml.h): 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR; 5 CONT continues the previous line.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_llama_log = logging.getLogger("llama.cpp")
_last_level = logging.DEBUG
_demoted = threading.local()  # `on`: this thread's llama.cpp messages are logged at DEBUG


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp prints hundreds of lines per model load to stderr; route them into logging instead.
    global _last_level
    _last_level = _GGML_LEVELS.get(level, _last_level)
    effective = logging.DEBUG if getattr(_demoted, "on", False) else _last_level
    if _llama_log.isEnabledFor(effective):
        _llama_log.log(effective, "%s", text.decode("utf-8", errors="replace").rstrip("\n"))


@contextmanager
def llama_messages_at_debug() -> Iterator[None]:
    """llama.cpp's messages from this thread are logged at DEBUG meanwhile: a decode stopped on
    purpose reports it in four ERROR lines, and the caller reports what matters itself."""
    _demoted.on = True
    try:
        yield
    finally:
        _demoted.on = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


class ModelLoadError(Exception):
    """The file is missing or llama.cpp cannot load it."""


def _pin_kernels(deterministic: bool) -> None:
    global _kernels_pinned
    with _backend_lock:
        if _kernels_pinned is None:
            os.environ[_TILED_MATMUL_ENV] = "0" if deterministic else "1"
            _kernels_pinned = deterministic
        elif _kernels_pinned != deterministic:
            raise ModelLoadError(
                f"this process already loaded a model with deterministic={_kernels_pinned}; llama.cpp picks its "
                "matrix kernels once per process, so every model in it must use the same setting"
            )


_DEFAULTS = EngineSettings()  # the engine flags' defaults, defined once


class LoadedModel:
    """Weights, vocabulary and context of one served model."""

    def __init__(
        self,
        model_id: str,
        path: Path,
        *,
        context_per_sequence: int = _DEFAULTS.context_per_sequence,
        max_sequences: int = _DEFAULTS.max_sequences,
        batch_size: int = _DEFAULTS.batch_size,
        threads: int | None = _DEFAULTS.threads,
        deterministic: bool = _DEFAULTS.deterministic,
        flash_attention: bool = _DEFAULTS.flash_attention,
    ) -> None:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        _pin_kernels(deterministic)
        _init_backend()
        self.model_id = model_id
        self.path = path
        self.max_sequences = max_sequences
        self.deterministic = deterministic
        self.flash_attention = flash_attention
        # A row's logits do not depend on the other rows of its step nor on how its sequence's
        # positions were chunked: speculation and any-boundary prefix reuse keep output identical.
        self.rows_independent = deterministic and flash_attention
        # Whether reusing KV computed in other chunks or steps (the prefix cache at any boundary,
        # idle prefill) and checking guesses (speculation) leave output as it is: with independent
        # rows by construction, and trivially where output was not promised to be deterministic.
        self.reuse_keeps_output = self.rows_independent or not deterministic
        self.batch_size = batch_size

        model_params = llama_cpp.llama_model_default_params()
        # llama.cpp repacks Q4_K weights for a matrix kernel that it uses only from 4 rows on, so a
        # sequence's logits would depend on how many others share its decode step. Without the
        # extra buffer types every batch size takes the same path (with the tiled kernel pinned
        # above: identical logits for 1 to 16 rows).
        model_params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        # A recurrent (or hybrid) model's memory keeps a state per sequence, not per position: it
        # cannot drop the last positions again.
        self.is_recurrent = bool(
            llama_cpp.llama_model_is_recurrent(self.model) or llama_cpp.llama_model_is_hybrid(self.model)
        )
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.context_train = llama_cpp.llama_model_n_ctx_train(self.model)

        threads = threads or usable_cpus()
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = min(context_per_sequence, self.context_train) * max_sequences
        context_params.n_batch = batch_size
        context_params.n_ubatch = batch_size
        context_params.n_seq_max = max_sequences
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        # Separate KV streams: sequences share no prefix yet, and each gets its whole window.
        context_params.kv_unified = False
        context_params.no_perf = True
        # Pinned rather than "auto" so that output does not depend on how llama.cpp resolves it. Off,
        # the unfused attention multiplies F16 KV with another kernel from 2 query rows on, so rows
        # are independent of the other sequences in a step but not of their own sequence's other
        # rows (docs/engine.md, "Flash attention"; benchmarks/attention.py).
        context_params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self.flash_attention
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if self.rows_independent:
            context_params.type_v = GGML_TYPE_BF16
        self.context = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.context:
            raise ModelLoadError(f"llama.cpp could not create a context for {path}")
        self.memory = llama_cpp.llama_get_memory(self.context)
        self.context_per_sequence = llama_cpp.llama_n_ctx_seq(self.context)

        self.architecture = self.metadata("general.architecture") or "unknown"
        self.bos_text = self._special_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(llama_cpp.llama_vocab_eos(self.vocab))
        embedded_template = llama_cpp.llama_model_chat_template(self.model, None)
        self.template = ChatTemplate.for_model(
            embedded_template.decode() if embedded_template else None,
            self.architecture,
            bos_token=self.bos_text,
            eos_token=self.eos_text,
        )
        self.system_fingerprint = self._fingerprint()
        # A token's text as stored (SentencePiece's "▁" for a space, "<0x41>" for a byte) is never
        # shorter than the text it stands for, so no token covers more than this many bytes of a
        # prompt: a prompt of B bytes takes at least B / this many tokens (request.py's cheap bound).
        get_text = llama_cpp.llama_vocab_get_text
        self.longest_token_bytes = max(len(get_text(self.vocab, token) or b"") for token in range(self.vocab_size))
        self.token_bytes = lru_cache(maxsize=None)(self._token_bytes)

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(512)
        length = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        if length < 0:
            return None
        if length >= len(buffer):
            buffer = ctypes.create_string_buffer(length + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace")

    def _fingerprint(self) -> str:
        # Names the exact weights and engine build: a changed file or llama.cpp gives another one.
        stat = self.path.stat()
        identity = f"{self.path.name}:{stat.st_size}:{int(stat.st_mtime)}:{llama_cpp.__version__}"
        return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]

    def _piece(self, token: int, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        length = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:length]

    def _special_text(self, token: int) -> str:
        return self._piece(token, True).decode("utf-8", errors="replace") if token >= 0 else ""

    def _token_bytes(self, token: int) -> bytes:
        """The bytes a token adds to the output text (control tokens add none)."""
        return self._piece(token, False)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:count])

    def render_prompt(self, messages: list[dict[str, Any]], tools: list[ToolSpec] | None = None) -> list[int]:
        """The messages (and tools) through the chat template, then tokenized with special tokens parsed."""
        tools = tools or []
        if self.template.knows_tools:
            prompt = self.template.render(messages, tools=[t.as_openai() for t in tools] or None)
        else:
            prompt = self.template.render(messages_for_builtin_format(messages, tools))
        tokens = self.tokenize(prompt, add_special=False, parse_special=True)
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        # A template that leaves BOS out relies on the tokenizer to add it, as llama.cpp's server does.
        if llama_cpp.llama_vocab_get_add_bos(self.vocab) and bos >= 0 and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def close(self) -> None:
        if self.context:
            llama_cpp.llama_free(self.context)
            self.context = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
