"""The OpenAI-compatible API's pure parts: request validation, response and chunk rendering, stop sequences, keys.

No web framework, torch or tokenizer here: every untrusted field of a request is checked by explicit code that
raises :class:`ApiError` naming the field, and the server (swarm.api.server) only moves bytes and events.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from swarm.api.config import MAX_STOP_SEQUENCES

Kind = Literal["completion", "chat"]

# Roles a chat message may have; OpenAI's "developer" is its newer name for "system", which templates know.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's int64; torch.Generator.manual_seed takes it as is
# Fields OpenAI defines that this server accepts only at their neutral value (what the client sends by default).
NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user"}
COMPLETION_FIELDS = (
    COMMON_FIELDS
    | {"prompt", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias"}
    | {
        "echo",
        "best_of",
        "suffix",
    }
)
CHAT_FIELDS = (
    COMMON_FIELDS
    | {"messages", "max_completion_tokens", "presence_penalty", "frequency_penalty"}
    | {
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    }
)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class Limits:
    """The request limits of ApiConfig that validation applies."""

    model_name: str
    max_tokens_limit: int
    default_max_tokens: int


@dataclass
class GenerationRequest:
    """A validated completion or chat completion request."""

    kind: Kind
    model: str
    max_tokens: int
    prompt: str | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat: role and content, ready for the chat template
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def parse_request(body: dict[str, Any], kind: Kind, limits: Limits) -> GenerationRequest:
    """Check every field of a /v1/completions or /v1/chat/completions body."""
    allowed = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"unsupported field {name!r}", param=name, code="unsupported_field")
    for name, neutral in NEUTRAL_FIELDS.items():
        if name in body and body[name] not in neutral:
            raise ApiError(
                400, f"{name}: only the default ({neutral[-1]!r}) is supported", param=name, code="unsupported_value"
            )
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid("model", "required, a string")
    if model != limits.model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {limits.model_name!r}",
            param="model",
            code="model_not_found",
        )
    request = GenerationRequest(kind=kind, model=model, max_tokens=_max_tokens(body, kind, limits))
    if kind == "completion":
        request.prompt = _prompt(body.get("prompt"))
    else:
        request.messages = _messages(body.get("messages"))
    request.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    request.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if request.top_p == 0:
        raise invalid("top_p", "must be > 0")
    request.seed = _seed(body.get("seed"))
    request.stop = _stop(body.get("stop"))
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, "n: only n = 1 is supported", param="n", code="unsupported_value")
    request.stream = _bool(body, "stream")
    request.include_usage = _stream_options(body.get("stream_options"), request.stream)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "must be a string")
    return request


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _max_tokens(body: dict[str, Any], kind: Kind, limits: Limits) -> int:
    name, value = "max_tokens", body.get("max_tokens")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        if value is not None:
            raise invalid("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        name, value = "max_completion_tokens", body["max_completion_tokens"]
    if value is None:
        return limits.default_max_tokens
    if not _is_int(value) or value < 1:
        raise invalid(name, "must be an integer >= 1")
    if value > limits.max_tokens_limit:
        raise ApiError(
            400,
            f"{name}: at most {limits.max_tokens_limit} on this server, got {value}",
            param=name,
            code="max_tokens_exceeded",
        )
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not low <= value <= high:
        raise invalid(name, f"must be a number in [{low:g}, {high:g}]")
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, "must be true or false")
    return value


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise invalid("seed", "must be a 64-bit signed integer")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} sequences")
    if any(not s for s in stops):
        raise invalid("stop", "sequences must not be empty")
    return tuple(stops)


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise invalid("stream_options", "only allowed with stream = true")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise invalid("stream_options", "only include_usage is supported")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "must be true or false")
    return include


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # a batch of one prompt
    if isinstance(value, list):
        raise ApiError(
            400, "prompt: only one prompt per request is supported", param="prompt", code="unsupported_value"
        )
    if not isinstance(value, str):
        raise invalid("prompt", "required, a string")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "required, a non-empty list")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, "must be an object")
        for key in message:
            if key not in ("role", "content", "name"):
                raise ApiError(400, f"{where}.{key} is not supported", param=f"{where}.{key}", code="unsupported_field")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise invalid(f"{where}.name", "must be a string")
        messages.append({"role": CHAT_ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return messages


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
            raise ApiError(400, f"{where}[{j}]: only text parts are supported", param=where, code="unsupported_value")
        if not isinstance(part["text"], str):
            raise invalid(f"{where}[{j}].text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def check_prompt_length(request: GenerationRequest, n_tokens: int, max_prompt_tokens: int, context: int) -> None:
    """The prompt's token count (after the chat template) against --max-prompt-tokens, and the prompt plus
    max_tokens against the model's context length (its max_position_embeddings)."""
    param = "prompt" if request.kind == "completion" else "messages"
    if n_tokens == 0:
        raise invalid(param, "the prompt is empty after tokenization")
    if n_tokens > max_prompt_tokens:
        raise ApiError(
            400,
            f"{param}: the prompt has {n_tokens} tokens; this server takes at most {max_prompt_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    if n_tokens + request.max_tokens > context:
        raise ApiError(
            400,
            f"the prompt's {n_tokens} tokens plus max_tokens {request.max_tokens} exceed the model's context of "
            f"{context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )


def check_bearer(authorization: str | None, keys: frozenset[str] | None) -> None:
    """Accept a request whose Authorization header holds one of `keys` (any request if there are none)."""
    if keys is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    # compare_digest against every key: how long the check takes says nothing about which key came close
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")


# -- stop sequences and streamed text ------------------------------------------------------------------------------


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence begins in `text` (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins some stop sequence: text that must be held back, as the
    next token may complete the stop (and a stop sequence is never sent)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


@dataclass
class StreamText:
    """Turns generated token ids into text deltas: what can be sent now, and whether a stop sequence was reached.

    `decode` maps all token ids so far to their text. The text sent is always a prefix of the final text: a
    trailing incomplete character (U+FFFD while a multi-byte character is split over tokens) and a possible start of
    a stop sequence are held back until the next token decides them.
    """

    decode: Callable[[list[int]], str]
    stops: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text sent so far
    text: str = ""
    stopped: bool = False

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text delta that can be sent now."""
        if self.stopped:
            raise RuntimeError("a stop sequence was already reached")
        self.ids.append(token_id)
        self.text = self.decode(self.ids)
        cut = first_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._send_to(cut)
        end = len(self.text) - partial_stop_length(self.text, self.stops)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        return self._send_to(end)

    def finish(self) -> str:
        """The rest of the text, once no token follows."""
        return self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta


# -- responses -----------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(
    request: GenerationRequest,
    request_id: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """The whole (not streamed) answer."""
    if request.kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": request.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    request: GenerationRequest,
    request_id: str,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    *,
    first: bool = False,
    usage_only: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a text delta, the last one with `finish_reason`, or (usage_only) the final usage chunk."""
    obj = "text_completion" if request.kind == "completion" else "chat.completion.chunk"
    body: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": request.model}
    if usage_only is not None:
        body["choices"], body["usage"] = [], usage_only
        return body
    if request.kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    else:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    body["choices"] = [choice]
    if request.include_usage:
        body["usage"] = None  # OpenAI: every chunk but the last has usage null when include_usage is set
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def models_body(model_name: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "blockswarm"}],
    }
