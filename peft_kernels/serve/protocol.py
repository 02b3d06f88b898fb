"""The OpenAI completions protocol: request bodies in (checked field by field), response bodies out."""
from __future__ import annotations

import time
import uuid
from typing import Optional

from .request import Event, GenerationRequest, RequestError

# fields this server takes only at these values (OpenAI accepts more)
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,), "suffix": (None, "")}


def _int(body: dict, key: str, default, lo: Optional[int] = None) -> Optional[int]:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {value!r}", key)
    if lo is not None and value < lo:
        raise RequestError(f"{key} must be >= {lo}, got {value}", key)
    return value


def _float(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key} must be a number, got {value!r}", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _token_list(value, key: str) -> list[int]:
    if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise RequestError(f"{key} must be a list of integer token ids", key)
    return value


def parse_completion(body, tokenizer) -> tuple[GenerationRequest, bool, bool]:
    """(the request, whether the prompt was token ids, whether to stream) of a ``/v1/completions`` body.

    Semantics: ``prompt`` is one text (needs ``tokenizer``) or one list of token ids; ``stop`` a
    string or a list of strings; ``temperature`` 0 is greedy (OpenAI's default 1); ``max_tokens``
    defaults to 16. vLLM's ``top_k``, ``stop_token_ids``, ``ignore_eos`` are accepted. Several
    prompts, ``n`` / ``best_of`` > 1, ``echo``, ``logprobs`` and ``suffix`` are refused, naming the field.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model is required: the base model's name or an adapter's name (see /v1/models)", "model")
    for key, allowed in UNSUPPORTED.items():
        value = body.get(key)
        if not any(value is a or (a is not None and type(value) is type(a) and value == a) for a in allowed):
            raise RequestError(f"{key}={value!r} is not supported by this server", key)
    prompt = body.get("prompt")
    token_prompt = isinstance(prompt, list)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("a text prompt needs a tokenizer and the model directory has none; send token ids",
                               "prompt")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    elif token_prompt and prompt and all(isinstance(p, (list, str)) for p in prompt):
        raise RequestError("one prompt per request: send a string or a list of token ids", "prompt")
    elif token_prompt:
        ids = _token_list(prompt, "prompt")
    else:
        raise RequestError("prompt is required: a string or a list of token ids", "prompt")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or any(not isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    request = GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}", model=model, prompt_ids=list(ids),
        max_tokens=_int(body, "max_tokens", 16, lo=1),
        temperature=_float(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, lo=0) if body.get("top_k") != -1 else 0,
        seed=_int(body, "seed", None),
        stop=stop, stop_token_ids=_token_list(body.get("stop_token_ids") or [], "stop_token_ids"),
        ignore_eos=ignore_eos, stream=stream)
    return request, token_prompt, stream


def include_usage(body: dict) -> bool:
    """Whether a streamed response ends with a usage chunk (``stream_options.include_usage``)."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return bool(options.get("include_usage", False))


def choice(text: str, token_ids: Optional[list[int]], finish_reason: Optional[str]) -> dict:
    """One ``choices`` entry (``token_ids`` only for token-id prompts)."""
    out = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


def completion(request: GenerationRequest, choices: list[dict], usage: Optional[dict]) -> dict:
    """A ``text_completion`` body (a whole response, or one streamed chunk)."""
    body = {"id": request.request_id, "object": "text_completion", "created": int(time.time()),
            "model": request.model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_of(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}
