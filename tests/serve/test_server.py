"""``python -m peft_kernels serve`` as a real server process on 127.0.0.1, driven by a real HTTP
client: a tiny random Llama and 6 PEFT adapters of 4 kinds saved with ``save_pretrained``."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import pytest
import torch

from peft_kernels import MultiAdapterModel
from peft_kernels.bench.serve import (Server, reference_tokens, send_all, tiny_llama, word_tokenizer, workload,
                                      write_workload)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp")  # the bench client (send_all)

NAMES = ["lora_a", "lora_b", "prefix_a", "prefix_b", "prompt", "ptuning"]
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, max_position_embeddings=1024)


def dirs_of(root):
    """(root, model dir, {adapter: dir}) of the workload written under ``root``."""
    model_dir, adapters, _ = write_workload(root, **SMALL)
    return root, model_dir, adapters


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return dirs_of(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def servers(dirs):
    """The main server, and a small one (KV for one request at a time, a queue of one) started beside it."""
    root, model_dir, adapters = dirs
    main = Server(model_dir, adapters, "--max-batch-tokens", "512", log=root / "main.log")
    per_token = 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 KV heads x head_dim 8, fp32
    small = Server(model_dir, {"lora_a": adapters["lora_a"]}, "--kv-cache-bytes", str(per_token * 200),
                   "--max-queue", "1", log=root / "small.log")
    try:
        yield main.wait(), small.wait()
    finally:
        main.close()
        small.close()
        for s in (main, small):
            assert s.proc.returncode is not None


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def reference(dirs):
    _, _, adapters = dirs
    model = MultiAdapterModel(tiny_llama(0, **SMALL)).eval()
    for name, path in adapters.items():
        model.load_adapter(path, name)
    return model


def _model(server, adapter):
    return server.name if adapter is None else adapter


def _complete(server, **body):
    return httpx.post(server.url + "/v1/completions", json=body, timeout=120)


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f"peft_kernels_serve_{name} "):
            return float(line.split()[-1])
    raise KeyError(name)


def _sse(lines):
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_lists_the_base_model_and_every_adapter(server):
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == [server.name, *NAMES]
    kinds = {m["id"]: m["peft_type"] for m in data}
    assert kinds["lora_b"] == "LORA" and kinds["prefix_a"] == "PREFIX_TUNING" and kinds["ptuning"] == "P_TUNING"
    assert all(m["parent"] == server.name for m in data[1:]) and httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("adapter", [None, *NAMES])
def test_greedy_tokens_per_kind_equal_generate_alone(server, reference, adapter):
    prompt = [5, 17, 33, 8, 61]
    r = _complete(server, model=_model(server, adapter), prompt=prompt, max_tokens=7, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["token_ids"] == reference_tokens(reference, [dict(adapter=adapter, prompt=prompt, max_tokens=7)])[0]
    assert choice["finish_reason"] == "length" and body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7,
                                                                     "total_tokens": 12}


def test_64_concurrent_requests_over_6_adapters_and_base_lose_and_cross_nothing(server, reference):
    requests = workload(64, [None, *NAMES], SMALL["vocab_size"], seed=5, lengths=(1, 16), new=(1, 16))
    steps = _metric(server, "steps_total")
    _, got = asyncio.run(send_all(server.url, lambda a: _model(server, a), requests, stream=False))
    want = reference_tokens(reference, requests)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g["status"] != 200 or g["tokens"] != w]
    assert not bad, f"requests {bad} differ from generate alone"
    assert _metric(server, "steps_total") - steps < sum(r["max_tokens"] for r in requests) / 4  # they were batched
    assert _metric(server, "running_requests") == 0 and _metric(server, "kv_cache_reserved_bytes") == 0


def test_a_prompt_longer_than_a_step_is_prefilled_in_chunks(server, reference):
    ids = torch.randint(3, 97, (700,), generator=torch.Generator().manual_seed(2)).tolist()  # steps take 512
    r = _complete(server, model="prefix_b", prompt=ids, max_tokens=5, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == reference_tokens(reference, [dict(
        adapter="prefix_b", prompt=ids, max_tokens=5)])[0]


def test_streaming_sends_each_token_as_it_comes_then_usage_and_done(server, reference):
    prompt, n = [9, 2, 40], 6
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json=dict(model="prefix_b", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                stream_options={"include_usage": True})) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(list(r.iter_lines()))
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]]
    assert tokens == reference_tokens(reference, [dict(adapter="prefix_b", prompt=prompt, max_tokens=n)])[0]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None] * (n - 1) + ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == n and not chunks[-1]["choices"]


def test_text_prompts_decode_and_stop_strings_end_the_text(server, reference):
    r = _complete(server, model="lora_b", prompt="w5 w17 w33", max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    want = reference_tokens(reference, [dict(adapter="lora_b", prompt=[5, 17, 33], max_tokens=8)])[0]
    text = word_tokenizer(SMALL["vocab_size"]).decode(want, skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] == text and "token_ids" not in r.json()["choices"][0]
    stop = text.split()[3]
    r = _complete(server, model="lora_b", prompt="w5 w17 w33", max_tokens=8, temperature=0, stop=[stop])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[:text.index(stop)]


def test_seeded_sampling_repeats(server):
    body = dict(model="ptuning", prompt=[3, 4, 5], max_tokens=10, temperature=0.9, top_p=0.9, seed=123)
    a, b = (_complete(server, **body).json()["choices"][0]["token_ids"] for _ in range(2))
    assert a == b and len(a) == 10


def test_adapters_load_and_unload_while_requests_are_in_flight(server, reference, dirs):
    root, _, adapters = dirs
    copy_dir = root / "prompt_copy"
    if not copy_dir.exists():
        shutil.copytree(adapters["prompt"], copy_dir)
    traffic = workload(16, ["lora_a", None, "prefix_a", "ptuning"], SMALL["vocab_size"], seed=9, new=(10, 25))

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            background = asyncio.ensure_future(send_all(server.url, lambda a: _model(server, a), traffic, stream=False))
            await asyncio.sleep(0.3)
            r = await client.post(server.url + "/v1/load_lora_adapter",
                                  json=dict(lora_name="prompt2", lora_path=str(copy_dir)))
            assert r.status_code == 200, r.text
            r = await client.post(server.url + "/v1/completions",
                                  json=dict(model="prompt2", prompt=[7, 8, 9], max_tokens=5, temperature=0))
            loaded = r.json()["choices"][0]["token_ids"]
            r = await client.post(server.url + "/v1/unload_lora_adapter", json=dict(lora_name="prompt2"))
            assert r.status_code == 200, r.text
            after = await client.post(server.url + "/v1/completions",
                                      json=dict(model="prompt2", prompt=[7, 8, 9], max_tokens=5))
            return loaded, after, await background

    loaded, after, (_, got) = asyncio.run(scenario())
    assert loaded == reference_tokens(reference, [dict(adapter="prompt", prompt=[7, 8, 9], max_tokens=5)])[0]
    assert after.status_code == 404 and after.json()["error"]["param"] == "model"
    assert [g["tokens"] for g in got] == reference_tokens(reference, traffic)
    assert "prompt2" not in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]


def test_a_client_that_disconnects_frees_its_slot(server):
    cancelled = _metric(server, "requests_total{outcome=\"cancelled\"}")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json=dict(model="lora_a", prompt=[4, 5], max_tokens=900, stream=True)) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leaving the block closes the connection mid-stream
    # non-streaming: a raw socket that sends its request and hangs up
    body = json.dumps(dict(model="prefix_a", prompt=[4, 5], max_tokens=900)).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _metric(server, "requests_total{outcome=\"cancelled\"}") < cancelled + 2:
        time.sleep(0.1)
    assert _metric(server, "requests_total{outcome=\"cancelled\"}") == cancelled + 2
    while time.monotonic() < deadline and _metric(server, "running_requests"):
        time.sleep(0.1)
    assert _metric(server, "running_requests") == 0 and _metric(server, "kv_cache_reserved_bytes") == 0


@pytest.mark.parametrize("body,status,param", [
    (dict(model="nope", prompt=[1, 2]), 404, "model"),
    (dict(prompt=[1, 2]), 400, "model"),
    (dict(model="lora_a", prompt=[]), 400, "prompt"),
    (dict(model="lora_a", prompt=""), 400, "prompt"),
    (dict(model="lora_a"), 400, "prompt"),
    (dict(model="lora_a", prompt=[1, 97]), 400, "prompt"),
    (dict(model="lora_a", prompt=[1, -1]), 400, "prompt"),
    (dict(model="lora_a", prompt=[[1, 2], [3]]), 400, "prompt"),
    (dict(model="lora_a", prompt=[1, 2], max_tokens=5000), 400, "max_tokens"),
    (dict(model="prefix_b", prompt=[1] * 10, max_tokens=1010), 400, "max_tokens"),  # 8 prefix positions too
    (dict(model="lora_a", prompt=[1, 2], max_tokens=0), 400, "max_tokens"),
    (dict(model="lora_a", prompt=[1, 2], max_tokens="5"), 400, "max_tokens"),
    (dict(model="lora_a", prompt=[1, 2], temperature=-1), 400, "temperature"),
    (dict(model="lora_a", prompt=[1, 2], top_p=0), 400, "top_p"),
    (dict(model="lora_a", prompt=[1, 2], n=2), 400, "n"),
    (dict(model="lora_a", prompt=[1, 2], stop=[3]), 400, "stop"),
    (dict(model="lora_a", prompt=[1, 2], stop_token_ids=[500]), 400, "stop_token_ids"),
    (dict(model="lora_a", prompt=[1, 2], stream="yes"), 400, "stream"),
])
def test_bad_input_gets_a_4xx_naming_the_field(server, body, status, param):
    r = _complete(server, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_bodies_and_adapter_calls_get_4xx_and_the_server_keeps_serving(server, dirs):
    root, model_dir, adapters = dirs
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_lora_adapter", json=dict(lora_name="x", lora_path=str(model_dir)))
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"  # a model, not an adapter
    r = httpx.post(server.url + "/v1/load_lora_adapter",
                   json=dict(lora_name="lora_a", lora_path=str(adapters["lora_b"])))
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(server.url + "/v1/load_lora_adapter", json=dict(lora_name="../x", lora_path=str(adapters["lora_b"])))
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json=dict(lora_name="nope"))
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert _complete(server, model="lora_a", prompt=[1, 2], max_tokens=2).status_code == 200


def test_a_full_kv_budget_queues_and_a_full_queue_answers_429(servers):
    small = servers[1]  # KV for 200 tokens: one request of 2 + 150 at a time; one may wait
    body = dict(model="lora_a", prompt=[3, 4], max_tokens=150, temperature=0, ignore_eos=True)

    async def three():
        async with httpx.AsyncClient(timeout=120) as client:
            first = asyncio.ensure_future(client.post(small.url + "/v1/completions", json=body))
            while not _metric(small, "running_requests"):
                await asyncio.sleep(0.02)
            second = asyncio.ensure_future(client.post(small.url + "/v1/completions", json=body))
            while not _metric(small, "waiting_requests"):
                await asyncio.sleep(0.02)
            third = await client.post(small.url + "/v1/completions", json=body)
            return await first, await second, third

    first, second, third = asyncio.run(three())
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["token_ids"] == second.json()["choices"][0]["token_ids"]
    assert third.status_code == 429 and "retry" in third.json()["error"]["message"]
    assert _metric(small, "kv_cache_limit_bytes") == 2 * 2 * 2 * 8 * 4 * 200
    assert httpx.get(small.url + "/metrics").text.count("peft_kernels_serve_time_to_first_token_seconds_bucket") == 13


def test_a_bad_model_directory_exits_2_with_the_reason(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "peft_kernels", "serve", "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a transformers model directory" in out.stderr
    _, model_dir, _ = dirs_of(tmp_path)
    out = subprocess.run([sys.executable, "-m", "peft_kernels", "serve", "--model", str(model_dir),
                          f"--adapter=x={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "missing" in out.stderr  # raised in the engine process, reported here


def test_when_the_engine_process_dies_health_says_so_and_requests_in_flight_end(dirs):
    import os
    import signal

    root, model_dir, adapters = dirs
    with Server(model_dir, {"lora_a": adapters["lora_a"]}, log=root / "dies.log") as server:
        children = open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()
        engines = [c for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        assert len(engines) == 1  # the engine process (beside multiprocessing's resource tracker)

        async def cut_short():
            async with httpx.AsyncClient(timeout=120) as client:
                pending = asyncio.ensure_future(client.post(server.url + "/v1/completions", json=dict(
                    model="lora_a", prompt=[3, 4], max_tokens=1000, temperature=0, ignore_eos=True)))
                while not _metric(server, "running_requests"):
                    await asyncio.sleep(0.02)
                os.kill(int(engines[0]), signal.SIGKILL)
                return await pending

        r = asyncio.run(cut_short())
        assert r.status_code == 500 and "engine" in r.json()["error"]["message"]
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "exited" in health.json()["error"]
        r = _complete(server, model="lora_a", prompt=[1, 2], max_tokens=2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
