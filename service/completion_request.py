"""Checking a CompletionRequest (the legacy text completion) and turning it into what the engine runs.

The same rule as for chats (request.py): every field is honoured or refused with INVALID_ARGUMENT
naming it, and the sampling, `n`, `stop` and streaming fields are checked by the same helpers. What
differs is the prompt: it is continued as it is, with no chat template, text tokenized with the
model's BOS token first and token ids taken as given. The checks that need no model come first
(`check_completion_parameters`), then those that need its vocabulary and context
(`build_completion_generation`).

Refused here because the engine cannot do them: `suffix` (fill-in-the-middle), `best_of` other than
`n` (ranking candidates), and `echo` with `logprobs` (the prompt's tokens have no log probabilities:
they are prefilled, never sampled).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from chatrpc.v1 import chat_pb2
from chatrpc.v1.wire import DEFAULT_COMPLETION_TOKENS
from service.errors import InvalidArgument
from service.limits import RequestLimits
from service.request import (
    Generation,
    SamplingParams,
    check_choices,
    check_logit_bias_tokens,
    check_sampling,
    check_stop,
    check_streaming,
    least_tokens,
)

if TYPE_CHECKING:
    from service.engine.model import LoadedModel

# OpenAI's bound on a text completion's `logprobs` (the alternatives per token).
MAX_COMPLETION_LOGPROBS = 5


@dataclass(frozen=True)
class CheckedCompletion:
    """The request's parameters, checked, before the model is involved."""

    prompt_text: str | None  # None: the prompt is token ids
    prompt_ids: list[int] | None
    max_tokens: int | None  # None: the default (DEFAULT_COMPLETION_TOKENS, or less if the context is short)
    stop: list[str]
    sampling: SamplingParams
    include_usage: bool
    n: int
    echo: bool
    suffix: bool  # a non-empty suffix was asked for


@dataclass(frozen=True)
class CompletionGeneration:
    """What the engine runs for the request, and the text each choice starts with (with echo)."""

    generation: Generation
    echo_text: str


def _prompt(request: chat_pb2.CompletionRequest) -> tuple[str | None, list[int] | None]:
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text, None
    if which == "tokens":
        if not request.tokens.ids:
            raise InvalidArgument("prompt", "A 'prompt' given as token ids needs at least one.")
        return None, list(request.tokens.ids)
    raise InvalidArgument("prompt", "'prompt' is required: text or token ids.")


def check_completion_parameters(
    request: chat_pb2.CompletionRequest, *, streaming: bool, max_choices: int, limits: RequestLimits
) -> CheckedCompletion:
    """All checks that need no model, in the order OpenAI lists the fields."""
    prompt_text, prompt_ids = _prompt(request)
    n = check_choices(request, max_choices)
    if request.HasField("best_of") and request.best_of != n:
        raise InvalidArgument(
            "best_of",
            f"'best_of' must equal 'n' ({n}), got {request.best_of}: this server does not generate extra "
            "candidates to rank.",
        )
    echo = request.HasField("echo") and request.echo
    sampling = check_sampling(request, limits)
    if request.HasField("logprobs"):
        if not 0 <= request.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidArgument(
                "logprobs", f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}], got {request.logprobs}."
            )
        if echo:
            raise InvalidArgument(
                "echo",
                "'echo' with 'logprobs' would need the log probabilities of the prompt's tokens, which this "
                "server does not compute.",
            )
        sampling = replace(sampling, logprobs=True, top_logprobs=request.logprobs)
    max_tokens = None
    if request.HasField("max_tokens"):
        if request.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"'max_tokens' must be at least 1, got {request.max_tokens}.")
        max_tokens = request.max_tokens
    stop = check_stop(request, limits)
    include_usage = check_streaming(request, streaming=streaming, stream_method="StreamCompletion")
    return CheckedCompletion(
        prompt_text=prompt_text,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        stop=stop,
        sampling=sampling,
        include_usage=include_usage,
        n=n,
        echo=echo,
        # An empty suffix asks for nothing after the completion, which is what every completion has.
        suffix=request.HasField("suffix") and bool(request.suffix),
    )


def _context_error(context: int, prompt_tokens: int | str) -> InvalidArgument:
    return InvalidArgument(
        "prompt",
        f"This model's maximum context length is {context} tokens, but the prompt takes {prompt_tokens} tokens.",
    )


def _prompt_tokens(checked: CheckedCompletion, model: LoadedModel) -> list[int]:
    """The prompt as token ids, each of the vocabulary and fewer than the context holds."""
    context = model.context_per_sequence
    if checked.prompt_ids is not None:
        tokens = checked.prompt_ids
        if len(tokens) >= context:
            raise _context_error(context, len(tokens))
        for position, token in enumerate(tokens):
            if not 0 <= token < model.vocab_size:
                raise InvalidArgument(
                    "prompt",
                    f"Token id {token} at position {position} of 'prompt' is not in the vocabulary "
                    f"[0, {model.vocab_size}).",
                )
        return tokens
    text = checked.prompt_text or ""
    # Refused for the cost of its length when it cannot fit, rather than tokenized (request.py).
    least = least_tokens(len(text), model.longest_token_bytes)
    if least >= context:
        raise _context_error(context, f"at least {least}")
    tokens = model.tokenize(text, add_special=True, parse_special=False)
    if not tokens:
        raise InvalidArgument("prompt", f"The prompt is empty, and the model '{model.model_id}' adds no BOS token.")
    if len(tokens) >= context:
        raise _context_error(context, len(tokens))
    return tokens


def _echo_text(checked: CheckedCompletion, model: LoadedModel) -> str:
    if not checked.echo:
        return ""
    if checked.prompt_text is not None:
        return checked.prompt_text  # as the client wrote it (its BOS token has no text)
    # Control tokens have no text, as in generated text (LoadedModel.token_bytes).
    return b"".join(model.token_bytes(token) for token in checked.prompt_ids or ()).decode(errors="replace")


def build_completion_generation(checked: CheckedCompletion, model: LoadedModel) -> CompletionGeneration:
    """The checks that need the model: what it can do, token ids in its vocabulary, prompt and
    budget in its context."""
    if checked.suffix:
        raise InvalidArgument(
            "suffix", f"The model '{model.model_id}' cannot fill in the middle: 'suffix' is not supported."
        )
    check_logit_bias_tokens(checked.sampling, model)
    prompt_tokens = _prompt_tokens(checked, model)
    context = model.context_per_sequence
    room = context - len(prompt_tokens)
    if checked.max_tokens is None:
        # OpenAI's default, but never one the client did not ask for that the context cannot hold.
        max_new_tokens = min(DEFAULT_COMPLETION_TOKENS, room)
    elif checked.max_tokens > room:
        raise InvalidArgument(
            "max_tokens",
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_tokens) + checked.max_tokens} tokens ({len(prompt_tokens)} in the prompt, "
            f"{checked.max_tokens} in the completion).",
        )
    else:
        max_new_tokens = checked.max_tokens
    generation = Generation(
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        stop=checked.stop,
        sampling=checked.sampling,
        n=checked.n,
    )
    return CompletionGeneration(generation, _echo_text(checked, model))
