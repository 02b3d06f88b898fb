"""What a client asks the engine for, what the engine sends back, and how a request is refused."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class RequestError(ValueError):
    """A request the server refuses: ``status`` (an HTTP 4xx), the ``param`` it is about (None: the
    request as a whole), and an OpenAI error ``type`` / ``code``."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        """The OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """One completion request, checked for form (the engine checks it against the model).

    Semantics: ``model`` is the base model's served name or an adapter's name; ``prompt_ids`` the
    prompt's token ids; ``temperature`` 0 is greedy; ``stop`` strings end the text (they need a
    tokenizer) and ``stop_token_ids`` end the tokens; ``ignore_eos`` keeps going past the
    model's end-of-sequence tokens; ``stream`` says the client reads the text piece by piece (the
    engine then decodes it every step; otherwise once, at the end, unless stop strings need it).
    """

    request_id: str
    model: str
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False


@dataclass
class Event:
    """What the engine reports of a request after a step: the new token ids, the new text, and
    the finish reason once it is done (``"stop"``, ``"length"``, ``"error"``, with ``error`` the
    message of the last)."""

    token_ids: list[int]
    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
