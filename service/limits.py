"""The most a client may put into one request, each checked before the work it would cost.

Every limit here is a flag of `chatrpc grpc` / `chatrpc serve` (chatrpc/cli.py) and is refused with
INVALID_ARGUMENT naming the field (a 400 through REST), except the size of the whole request: the
gRPC server refuses a larger message before decoding it (RESOURCE_EXHAUSTED) and the REST adapter
refuses a larger body before reading it (413 `request_too_large`). `n` is bounded by --max-n
(models.py) and the prompt by the model's context (request.py).
"""

from __future__ import annotations

from dataclasses import dataclass

_KIB = 1024
_MIB = 1024 * _KIB


@dataclass(frozen=True)
class RequestLimits:
    # The request as received: a JSON body on REST, a protobuf message on gRPC. The whole request is
    # read and parsed before anything else can be checked, so this bounds that first, unavoidable
    # cost (benchmarks/isolation.py measures what it costs the other clients).
    max_request_bytes: int = 1 * _MIB
    max_messages: int = 2048
    # OpenAI's own bound on `stop`. Each stop string is matched against the text at every step and
    # held-back text waits for the longest one, so its length is bounded too (characters).
    max_stop_strings: int = 4
    max_stop_length: int = 1024
    # OpenAI's own bound on `tools`.
    max_tools: int = 128
    # The JSON schemas of tools and response_format together, as encoded in the request: each is
    # compiled into a grammar before generation starts.
    max_schema_bytes: int = 256 * _KIB
    max_logit_bias: int = 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
