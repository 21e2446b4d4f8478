"""The OpenAI API's request bodies and their translation to engine requests.

The fields this server knows are validated strictly (pydantic strict mode: "8" is not an
int, 1 is not a bool), naming the field. Unknown fields are ignored, as vLLM does, and their
names logged once (a warning on the "ringfuse.serve" logger): balancers and load tools add
their own (sglang-router re-encodes every body with ``skip_special_tokens``,
``no_stop_trim``, ``separate_reasoning``, ...; GuideLLM sends
``stream_options.continuous_usage_stats``), and a 400 on them would break every routed
request. OpenAI fields the engine does not implement are accepted only at their no-op
values (``presence_penalty`` 0, ``echo`` false, ...), so a client that sends defaults works
and one that relies on them hears so.
vLLM's extensions ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are supported.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..runtime.engine import LLM
from ..runtime.sampling import SEED_LIMIT, SamplingParams

log = logging.getLogger("ringfuse.serve")

MAX_SEQUENCES = 128  # prompts x n of one request (OpenAI's limit on n)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit on top_logprobs)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left


class ParamError(ValueError):
    """A request the server refuses (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class _Body(BaseModel):
    # unknown fields are kept aside (model_extra) for ignored_fields(), never used
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _SamplingBody(_Body):
    # None means "the default" throughout: some clients send null for what they leave unset
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # default 1.0, as OpenAI
    top_p: float | None = None
    top_k: int | None = None  # vLLM's: 0 or -1 is off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = None  # vLLM's
    ignore_eos: bool | None = None  # vLLM's
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    # OpenAI's, not implemented: accepted at their no-op values only (see _NO_OPS)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions, not implemented: refused unless at their no-op values
    min_p: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None


class CompletionRequest(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # alternatives per token (0: only the chosen token's)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    # what the openai client writes back for an earlier assistant reply: ignored when null / empty
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None


class ChatRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None  # the older form of tools
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[Any] | None = None
    audio: Any = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt only (default true)
    add_generation_prompt: bool | None = None  # messages only (default true)


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# field -> (is the value a no-op?, what this server takes instead)
_NO_OPS = {
    "presence_penalty": (lambda v: v in (None, 0), "only 0; use repetition_penalty"),
    "frequency_penalty": (lambda v: v in (None, 0), "only 0; use repetition_penalty"),
    "logit_bias": (lambda v: not v, "only null or {}"),
    "echo": (lambda v: not v, "only false"),
    "suffix": (lambda v: not v, "only null"),
    "tools": (lambda v: not v, "only null or []: no tool calling"),
    "tool_choice": (lambda v: v in (None, "none"), "only null or \"none\""),
    "response_format": (lambda v: v in (None, {"type": "text"}), "only {\"type\": \"text\"}"),
    "functions": (lambda v: not v, "only null or []: no function calling"),
    "function_call": (lambda v: v in (None, "none"), "only null or \"none\""),
    "modalities": (lambda v: v in (None, ["text"]), "only [\"text\"]"),
    "audio": (lambda v: v is None, "only null: text output only"),
    "min_p": (lambda v: v in (None, 0), "only 0; use top_p or top_k"),
    "min_tokens": (lambda v: v in (None, 0), "only 0"),
    "stop_token_ids": (lambda v: not v, "only null or []; use stop strings"),
    "include_stop_str_in_output": (lambda v: not v, "only false"),
}
# what a field takes, for messages about wrong types (fields not listed: from their type)
_EXPECTED = {
    "prompt": "a string, an array of strings, an array of token ids or an array of token-id arrays",
    "stop": "a string or an array of strings",
    "messages": "an array of {\"role\", \"content\"} objects",
    "content": "a string, an array of {\"type\": \"text\", \"text\"} objects, or null",
}
_TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
               "list_type": "an array", "dict_type": "an object", "model_type": "an object"}  # fmt: skip
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object",
               type(None): "null"}  # fmt: skip
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


MAX_LOGGED_NAMES = 1024  # distinct ignored field names remembered; past that, later ones go to debug
_logged_names: set[str] = set()  # ignored field names already logged
_logged_lock = threading.Lock()  # parse() runs on the event loop, but tests and tools may call it anywhere


def parse(model: type[BaseModel], body: dict) -> Any:
    """The body as ``model``, or ParamError naming the field, what it takes and what came.
    Unknown fields are ignored; each name is logged once (see the module's docstring)."""
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise _param_error(e) from None
    ignored = ignored_fields(req)
    if ignored:
        _log_ignored(ignored)
    return req


def ignored_fields(obj: BaseModel, prefix: str = "") -> list[str]:
    """The unknown fields of a parsed body, nested ones as ``stream_options.x``, those of
    array items as ``messages.*.x`` (one name whatever the index)."""
    out = [prefix + k for k in obj.model_extra or ()]
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            out += ignored_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    out += ignored_fields(item, f"{prefix}{name}.*.")
    return sorted(set(out))


def _log_ignored(names: list[str]) -> None:
    # once per name: a balancer adds the same fields to every request
    names = [n if len(n) <= 100 else n[:97] + "..." for n in names]  # a name is the client's to choose
    with _logged_lock:
        new = [n for n in names if n not in _logged_names]
        room = max(0, MAX_LOGGED_NAMES - len(_logged_names))
        _logged_names.update(new[:room])  # bounded: a client inventing names cannot grow it forever
    if new[:room]:
        log.warning("ringfuse serve: ignoring request fields this server does not know: %s (each name is "
                    "logged once)", ", ".join(new[:room]))  # fmt: skip
    if new[room:]:
        log.debug("ringfuse serve: ignoring request fields: %s", ", ".join(new[room:]))


def _param_error(e: ValidationError) -> ParamError:
    err = e.errors()[0]
    # drop pydantic's union-member tags ("str", "list[int]") from the location
    path = [p for p in err["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _UNION_TAGS)]
    param = ".".join(map(str, path)) or None
    if err["type"] == "missing":
        return ParamError(f"'{param}' is required", param, "missing_required_parameter")
    field = next((p for p in reversed(path) if isinstance(p, str)), None)
    expected = _EXPECTED.get(field) or _TYPE_WORDS.get(err["type"])
    got = err.get("input")
    if expected is None:  # a literal or another constraint: pydantic's message says it
        return ParamError(f"'{param}': {err['msg']}", param, "invalid_type")
    shown = repr(got) if len(repr(got)) <= 40 else repr(got)[:37] + "..."
    return ParamError(f"'{param}' must be {expected}, got {_JSON_TYPES.get(type(got), type(got).__name__)} {shown}",
                      param, "invalid_type")  # fmt: skip


@dataclasses.dataclass
class Job:
    """An HTTP request as engine work: prompts x n sequences, choice index = prompt * n + j."""

    prompts: list[list[int]]
    params: list[list[SamplingParams]]  # per prompt, per choice
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token, or None

    def sequences(self) -> list[tuple[list[int], SamplingParams]]:
        return [(ids, p) for ids, ps in zip(self.prompts, self.params) for p in ps]


def check_no_ops(req: BaseModel) -> None:
    for field, (is_no_op, takes) in _NO_OPS.items():
        if field in type(req).model_fields and not is_no_op(getattr(req, field)):
            raise ParamError(f"'{field}' is not supported by this server (it takes {takes}), got "
                             f"{getattr(req, field)!r}", field, "unsupported_parameter")  # fmt: skip


def _int_in(req, field: str, lo: int, hi: int | None = None, what: str = "") -> None:
    v = getattr(req, field)
    if v is not None and (v < lo or (hi is not None and v > hi)):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ParamError(f"'{field}' must be {rng}{what}, got {v}", field, "invalid_value")


def build_job(req: CompletionRequest | ChatRequest, prompts: list[list[int]], llm: LLM) -> Job:
    """Check the sampling fields and make the engine's SamplingParams for every choice.
    ``prompts``: token ids, already checked by LLM.encode."""
    chat = isinstance(req, ChatRequest)
    check_no_ops(req)
    _int_in(req, "n", 1, MAX_SEQUENCES)
    n = req.n or 1
    if len(prompts) * n > MAX_SEQUENCES:
        raise ParamError(f"{len(prompts)} prompts x n={n} make {len(prompts) * n} sequences; at most "
                         f"{MAX_SEQUENCES} per request", "n", "invalid_value")  # fmt: skip
    if req.stream_options is not None and not req.stream:
        raise ParamError("'stream_options' is only allowed with \"stream\": true", "stream_options", "invalid_value")
    if chat:
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ParamError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        _int_in(req, "max_completion_tokens", 1)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        _int_in(req, "top_logprobs", 0, MAX_LOGPROBS)
        if req.top_logprobs is not None and not req.logprobs:
            raise ParamError("'top_logprobs' needs \"logprobs\": true", "top_logprobs", "invalid_value")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens = req.max_tokens
        _int_in(req, "logprobs", 0, MAX_LOGPROBS)
        _int_in(req, "best_of", n, n, " (n: this server samples each choice once)")
        logprobs = req.logprobs
    _int_in(req, "max_tokens", 1)
    if req.top_k is not None and req.top_k < -1:
        raise ParamError(f"'top_k' must be >= 0 (0 or -1: off), got {req.top_k}", "top_k", "invalid_value")
    limit = llm.max_request_tokens
    params = []
    for ids in prompts:
        room = limit - len(ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" + {max_tokens} new tokens (max_tokens)" if max_tokens is not None else ""
            raise ParamError(f"a request can hold at most {limit} tokens (this server's context: max_model_len "
                             f"{llm.max_model_len}, KV cache {llm.kv.num_blocks * llm.block_size} tokens); this one "
                             f"asks for {len(ids)} prompt tokens{asked}", "messages" if chat else "prompt",
                             "context_length_exceeded")  # fmt: skip
        new = max_tokens if max_tokens is not None else room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
        choices = []
        for j in range(n):  # choice j draws from seed + j: n different samples, each reproducible
            seed = req.seed
            if seed is not None and 0 <= seed < SEED_LIMIT:  # out of range: SamplingParams says so
                seed = (seed + j) % SEED_LIMIT
            try:
                p = SamplingParams(max_new_tokens=new, temperature=1.0 if req.temperature is None else req.temperature,
                                   top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p,
                                   repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                                   seed=seed, stop=req.stop, ignore_eos=bool(req.ignore_eos),
                                   logprobs=logprobs)  # fmt: skip
                llm.check_request(len(ids), p)
            except (TypeError, ValueError) as e:  # the engine's messages start with the parameter's name
                name = str(e).split(" ", 1)[0]
                raise ParamError(str(e), name if name in type(req).model_fields else None, "invalid_value") from None
            choices.append(p)
        params.append(choices)
    stream = bool(req.stream)
    include_usage = bool(stream and req.stream_options is not None and req.stream_options.include_usage)
    return Job(prompts, params, n, stream, include_usage, logprobs)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them; text parts joined by newlines (as vLLM)."""
    out = []
    for i, m in enumerate(messages):
        for field in ("tool_calls", "function_call", "audio"):
            if getattr(m, field):
                raise ParamError(f"'messages.{i}.{field}' is not supported by this server (no tool calling or audio)",
                                 f"messages.{i}.{field}", "unsupported_parameter")  # fmt: skip
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])
        out.append({"role": m.role, "content": content})
    return out


def finish_reason(engine_reason: str) -> str:
    """The engine's eos / stop / length as OpenAI says it: stop / stop / length."""
    return "length" if engine_reason == "length" else "stop"
