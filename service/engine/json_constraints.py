"""JSON constraints: output that must be JSON (response_format, forced tool calls), guaranteed by
constrained decoding with llguidance against the model's own vocabulary.

The compiler turns a JSON schema into an llguidance grammar, refusing before any generation a schema
the engine cannot support. Each constrained sequence gets a matcher that, at every step, writes the
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

from service.errors import GenerationFailed, InvalidArgument

# Compact JSON (no optional whitespace): with free whitespace a small model can spend its whole
# budget on blank lines inside an unfinished object.
_JSON_OPTIONS = {"whitespace_flexible": False}

# response_format json_object: any JSON object, within bounds. A valid object is all the mode
# promises, and the bounds (no string over 256 characters, integers within ±10^15, at most 16
# members or items per object or array) keep a small model from spending its whole budget on one
# endless number or an endless run of keys, which would leave the JSON unfinished.
_JSON_VALUE = {"$ref": "#/$defs/value"}
JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "$defs": {
        "value": {
            "anyOf": [
                {"type": "string", "maxLength": 256},
                {"type": "integer", "minimum": -(10**15), "maximum": 10**15},
                {"type": "number", "minimum": -1e15, "maximum": 1e15},
                {"type": "boolean"},
                {"type": "null"},
                {"type": "array", "items": _JSON_VALUE, "maxItems": 16},
                {"type": "object", "additionalProperties": _JSON_VALUE, "maxProperties": 16},
            ]
        }
    },
    "type": "object",
    "additionalProperties": _JSON_VALUE,
    "maxProperties": 16,
}


class ConstraintCompiler:
    """Compiles JSON schemas for one model's vocabulary (its tokenizer is built once, at load)."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, vocab_size: int) -> None:
        ends = [t for t in (llama_cpp.llama_vocab_eot(vocab), llama_cpp.llama_vocab_eos(vocab)) if t >= 0]
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # uint32 words in a row of the token mask
        with warnings.catch_warnings():
            # llguidance reads each token's attributes with llama-cpp-python's deprecated
            # llama_token_get_attr: one DeprecationWarning per token of the vocabulary, none ours.
            warnings.simplefilter("ignore", DeprecationWarning)
            self._tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=ends)

    def from_json_schema(self, schema: dict[str, Any], *, param: str) -> str:
        """The llguidance grammar of `schema`; INVALID_ARGUMENT naming `param` when it cannot be had."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        except ValueError as error:
            raise InvalidArgument(param, f"The JSON schema in '{param}' is not valid: {error}") from error
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if problem:
            raise InvalidArgument(param, f"The JSON schema in '{param}' is not supported: {problem}")
        return grammar

    def matcher(self, grammar: str) -> ConstraintMatcher:
        return ConstraintMatcher(llguidance.LLMatcher(self._tokenizer, grammar, log_level=0))


class ConstraintMatcher:
    """One sequence's position in its grammar; a failure of the matcher is the sequence's failure."""

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
            raise GenerationFailed(f"grammar matcher failed: {self._matcher.get_error()}")
