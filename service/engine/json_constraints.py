"""Constrained decoding with llguidance: JSON schemas compiled against the model's own vocabulary.

The compiler turns a JSON schema into an llguidance grammar (refusing, before any generation, a schema
the engine cannot support). Each constrained sequence gets a matcher that, at every step, writes the
bitmask of allowed tokens into the row the Rust sampler reads, and advances with the chosen token.
When the JSON is complete the matcher allows only the end-of-turn token, so generation stops there.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import llama_cpp
import llguidance
import llguidance.llamacpp
import numpy as np

from service.errors import InvalidArgument

# Compact JSON (no optional whitespace): with free whitespace a small model can spend its whole
# budget on blank lines inside an unfinished object.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarCompiler:
    """Compiles JSON schemas for one model's vocabulary (building it takes a few seconds, once)."""

    def __init__(self, vocab, vocab_size: int) -> None:
        ends = [t for t in (llama_cpp.llama_vocab_eot(vocab), llama_cpp.llama_vocab_eos(vocab)) if t >= 0]
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        with warnings.catch_warnings():
            # llguidance reads each token's attributes with llama-cpp-python's deprecated
            # llama_token_get_attr: one DeprecationWarning per token (262,144 here), none ours.
            warnings.simplefilter("ignore", DeprecationWarning)
            self._tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=ends)

    def from_json_schema(self, schema: dict[str, Any], *, param: str) -> str:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        except ValueError as error:
            raise InvalidArgument(param, f"The JSON schema in '{param}' is not valid: {error}") from error
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if problem:
            raise InvalidArgument(param, f"The JSON schema in '{param}' is not supported: {problem}")
        return grammar

    def matcher(self, grammar: str) -> GrammarMatcher:
        return GrammarMatcher(llguidance.LLMatcher(self._tokenizer, grammar, log_level=0))


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher
        self._check()

    def fill_mask(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask (uint32 words, bit j = token j) into `row`."""
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        self._check()

    def advance(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self._matcher.get_error()}")
