"""The OpenAI-compatible HTTP API (FastAPI) over an engine in a process of its own
(:class:`~peft_kernels.serve.engine_process.EngineProcess`).

Routes: ``GET /v1/models``, ``POST /v1/completions`` (JSON or server-sent events),
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's names; any adapter kind),
``GET /health``, ``GET /metrics``. Refusals are 4xx with OpenAI's error body.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .engine_process import EngineProcess
from .protocol import choice, completion, include_usage, parse_completion, usage_of
from .request import Event, RequestError

log = logging.getLogger("peft_kernels.serve")


def create_app(engine: EngineProcess, model_path: str = ""):
    """The FastAPI app serving ``engine`` (started with the app, closed with it).

    Semantics: an adapter is requested by putting its name in ``model`` (vLLM's convention); a
    client that disconnects frees its slot at the next step.
    """
    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        engine.deliver = lambda events: loop.call_soon_threadsafe(_deliver, events)
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="peft_kernels serve", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        log.exception("internal error")
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                       "type": "internal_error", "param": None, "code": None}}, status_code=500)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": engine.error or "the engine is not running"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = await asyncio.wrap_future(engine.metrics_text())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        served, paths = await asyncio.wrap_future(engine.served())
        data = []
        for name, peft_type in served.items():
            base = peft_type is None
            data.append({"id": name, "object": "model", "created": now, "owned_by": "peft_kernels",
                         "root": model_path if base else paths.get(name, name),
                         "parent": None if base else engine.base_name, "peft_type": peft_type,
                         "max_model_len": engine.max_positions})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = await json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name:
            raise RequestError("lora_name is required: the adapter's name", "lora_name")
        if not isinstance(path, str) or not path:
            raise RequestError("lora_path is required: the adapter directory", "lora_path")
        await asyncio.wrap_future(engine.load_adapter(name, path))
        return PlainTextResponse(f"Success: adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = await json_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise RequestError("lora_name is required: the adapter's name", "lora_name")
        await asyncio.wrap_future(engine.unload_adapter(name))
        return PlainTextResponse(f"Success: adapter '{name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        req, token_prompt, stream = parse_completion(body, engine.tokenizer)
        usage_chunk = include_usage(body) if stream else False
        queue: asyncio.Queue[Event] = asyncio.Queue()
        await asyncio.wrap_future(engine.submit(req, queue.put_nowait))  # events come on this loop (see lifespan)

        if stream:
            async def chunks() -> AsyncIterator[str]:
                finished = False
                try:
                    while not finished:
                        events = [await queue.get()]
                        while not queue.empty():  # the client fell behind: one write for what is there
                            events.append(queue.get_nowait())
                        out = []
                        for event in events:
                            finished = event.finish_reason is not None
                            if event.error:
                                out.append(_sse({"error": {"message": event.error, "type": "internal_error",
                                                           "param": None, "code": None}}))
                                break
                            ids = event.token_ids if token_prompt else None
                            out.append(_sse(completion(req, [choice(event.text, ids, event.finish_reason)], None)))
                            if finished and usage_chunk:
                                out.append(_sse(completion(req, [], usage_of(event))))
                        if finished and not events[-1].error:
                            out.append("data: [DONE]\n\n")
                        yield "".join(out)
                finally:
                    if not finished:  # the client went away (or the response was cut): free its slot
                        engine.cancel(req.request_id)

            return StreamingResponse(chunks(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect():
            ids, text = [], ""
            while True:
                event = await queue.get()
                ids += event.token_ids
                text += event.text
                if event.finish_reason is not None:
                    return event, ids, text

        result = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not result.done():
                engine.cancel(req.request_id)
                result.cancel()
            gone.cancel()
        if not result.done() or result.cancelled():
            return Response(status_code=499)  # nobody is listening
        event, ids, text = result.result()
        if event.error:
            return JSONResponse({"error": {"message": event.error, "type": "internal_error", "param": None,
                                           "code": None}}, status_code=500)
        # a JSONResponse of the dict as it is: FastAPI's jsonable_encoder would walk every token id first
        return JSONResponse(completion(req, [choice(text, ids if token_prompt else None, event.finish_reason)],
                                       usage_of(event)))

    return app


def _deliver(events) -> None:
    for on_event, event in events:
        on_event(event)


async def _disconnected(request) -> None:
    """Returns once the client has gone away (the body is already read, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
