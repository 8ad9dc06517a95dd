"""How each model's engine is sized: the defaults of `chatrpc`'s engine flags, defined once.

The command line's flags, LoadedModel's and Scheduler's keyword arguments all default to these. A
module of its own, with nothing heavy imported, because the command line reads them before
llama.cpp may be loaded (chatrpc/cli.py; service/engine/openmp.py says why the order matters).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    """How each model's engine is sized (ModelRegistry); each field is a flag of `chatrpc serve`."""

    context_per_sequence: int = 4096
    max_sequences: int = 8
    batch_size: int = 512
    prefill_chunk: int = 256
    max_waiting: int = 256
    max_inflight_per_key: int = 0  # one API key's requests waiting or running at once (0: no limit; admission.py)
    max_slots_per_key: int = 0  # sequence slots one API key's running requests hold (0: no cap; admission.py)
    threads: int | None = None
    max_n: int = 8  # --max-n; `choice_limit` also bounds n by max_sequences
    prefix_cache: bool = True  # free slots keep their KV for requests that share its prefix
    idle_prefill: bool = True  # fast kernels: idle free slots prefill what their sequences generated (idle_prefill.py)
    deterministic: bool = True  # kernels that do not switch with a batch's shape: output does not depend on load
    flash_attention: bool = True  # llama.cpp's fused attention kernel (model.py: what it adds to `deterministic`)
    speculative_tokens: int = 10  # prompt-lookup guesses a sequence may check per step (0: off)
    speculative_ngram: tuple[int, int] = (2, 4)  # lengths of the history's ending that prompt lookup matches
