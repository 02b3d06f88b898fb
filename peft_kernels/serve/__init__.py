"""Serving many adapters of every kind at once: a continuous-batching engine and an
OpenAI-compatible HTTP server (``python -m peft_kernels serve``)."""
from .engine import Engine
from .request import Event, GenerationRequest, RequestError

__all__ = ["Engine", "Event", "GenerationRequest", "RequestError"]
