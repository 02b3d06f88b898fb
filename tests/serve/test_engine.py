"""The continuous-batching engine, without HTTP: each request's tokens equal its own generate run
alone, whatever joins or leaves the batch around it; sampling, KV budget, queue and cancellation."""
from __future__ import annotations

import threading
import uuid

import pytest
import torch

from models import tiny_llama
from peft_kernels import MultiAdapterModel
from peft_kernels.serve.engine import Engine
from peft_kernels.serve.request import GenerationRequest, RequestError

KINDS = {
    "lora": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
             "init_lora_weights": False},
    "prefix": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 5},
    "prompt": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
    "ptuning": {"peft_type": "P_TUNING", "num_virtual_tokens": 3},
    "bottleneck": {"peft_type": "BOTTLENECK", "r": 3},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultiAdapterModel(tiny_llama()).eval()
    for name, config in KINDS.items():
        m.add_adapter(name, config)
    with torch.no_grad():  # a new bottleneck adapter is the identity: give it weights
        for bank in m.kind("BOTTLENECK").sites.banks.values():
            bank.up.normal_()
    return m


class Collector:
    """Gathers one request's events; ``done`` is set at its finish reason."""

    def __init__(self):
        self.tokens, self.text, self.reason, self.error = [], "", None, None
        self.done = threading.Event()
        self.got = threading.Condition()

    def __call__(self, event):
        with self.got:
            self.tokens += event.token_ids
            self.text += event.text
            if event.finish_reason:
                self.reason, self.error = event.finish_reason, event.error
                self.done.set()
            self.got.notify_all()

    def wait_tokens(self, n: int, timeout: float = 60) -> None:
        with self.got:
            assert self.got.wait_for(lambda: len(self.tokens) >= n or self.done.is_set(), timeout)


def _request(model_name, ids, max_tokens, **kw):
    return GenerationRequest(uuid.uuid4().hex, model_name, list(ids), max_tokens=max_tokens,
                             temperature=kw.pop("temperature", 0.0), **kw)


def _alone(model, name, ids, n):
    return model.generate(torch.tensor([ids]), adapter_names=[name], max_new_tokens=n)[0, len(ids):].tolist()


def test_greedy_tokens_equal_each_request_run_alone_with_requests_joining_mid_batch(model):
    engine = Engine(model, base_name="base", max_batch_tokens=64).start()
    try:
        g = torch.Generator().manual_seed(3)
        waves = [[("lora", 5, 9), ("prefix", 7, 6), ("base", 3, 11)],
                 [("prompt", 4, 7), ("ptuning", 6, 5), ("bottleneck", 2, 8)],
                 [("prefix", 9, 4), ("lora", 1, 6), ("prompt", 8, 3), ("bottleneck", 5, 5)]]
        runs = []
        for wave in waves:
            if runs:  # the next wave joins while the earlier requests are decoding
                runs[0][-1].wait_tokens(len(runs) * 2)
            for name, L, n in wave:
                ids = torch.randint(3, 97, (L,), generator=g).tolist()
                c = Collector()
                engine.submit(_request(name, ids, n), c)
                runs.append((name, ids, n, c))
        for name, ids, n, c in runs:
            assert c.done.wait(120) and c.reason == "length", (name, c.reason, c.error)
            assert c.tokens == _alone(model, None if name == "base" else name, ids, n), name
        assert engine.metrics.steps < sum(n for _, _, n, _ in runs)  # requests really shared steps
        assert engine.metrics.requests["finished"] == len(runs) and engine._reserved == 0
    finally:
        engine.close()


def test_prompts_longer_than_a_step_are_prefilled_in_chunks_and_equal_generate_alone(model):
    # 12 slots a step: each prompt below takes several steps, beside requests already decoding
    engine = Engine(model, base_name="base", max_batch_tokens=12)
    real, step_slots = engine.runner.run, []

    def run(*args):
        result = real(*args)
        step_slots.append(int(result.slots.sum()))  # soft-prompt slots included
        return result

    engine.runner.run = run
    engine.start()
    try:
        g = torch.Generator().manual_seed(5)
        runs = []
        for name, L, n in [("lora", 3, 20), ("prefix", 30, 5), ("prompt", 25, 4), ("ptuning", 9, 6),
                           ("bottleneck", 17, 3), ("base", 40, 4)]:
            ids = torch.randint(3, 97, (L,), generator=g).tolist()
            c = Collector()
            engine.submit(_request(name, ids, n), c)
            runs.append((name, ids, n, c))
            if len(runs) == 1:
                c.wait_tokens(2)  # the long prompts arrive while it decodes
        for name, ids, n, c in runs:
            assert c.done.wait(120) and c.reason == "length", (name, c.reason, c.error)
            assert c.tokens == _alone(model, None if name == "base" else name, ids, n), name
        assert max(step_slots) == 12 and len(step_slots) == engine.metrics.steps
        assert engine.metrics.generation_tokens == sum(n for _, _, n, _ in runs)
    finally:
        engine.close()


def test_seeded_sampling_repeats_and_stop_token_ids_end_a_request(model):
    engine = Engine(model, base_name="base").start()
    try:
        ids = [5, 6, 7, 8]
        outs = []
        for _ in range(2):
            c = Collector()
            engine.submit(_request("lora", ids, 12, temperature=0.8, top_p=0.9, seed=11), c)
            assert c.done.wait(60)
            outs.append(c.tokens)
        assert outs[0] == outs[1] and len(outs[0]) == 12
        greedy = _alone(model, "prefix", ids, 6)
        c = Collector()
        engine.submit(_request("prefix", ids, 6, stop_token_ids=[greedy[2]]), c)
        assert c.done.wait(60) and c.reason == "stop"
        assert c.tokens == greedy[:greedy.index(greedy[2]) + 1]
    finally:
        engine.close()


def test_a_full_kv_budget_queues_requests_and_a_full_queue_refuses(model):
    per_token = 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 KV heads x head_dim 8, fp32
    engine = Engine(model, base_name="base", kv_cache_bytes=per_token * 20, max_queue=2)
    assert engine.bytes_per_token == per_token
    with pytest.raises(RequestError) as err:  # can never fit
        engine.submit(_request("base", [4] * 10, 12), Collector())
    assert err.value.param == "max_tokens" and err.value.status == 400
    cs = [Collector() for _ in range(3)]
    for c in cs:  # not started: nothing is admitted, three fit in the queue of two
        if c is cs[-1]:
            with pytest.raises(RequestError) as err:
                engine.submit(_request("base", [4] * 6, 8), c)
            assert err.value.status == 429 and "--max-queue 2" in err.value.message
        else:
            engine.submit(_request("base", [4] * 6, 8), c)
    engine.start()
    try:
        for c in cs[:2]:
            assert c.done.wait(60) and len(c.tokens) == 8
        assert engine.metrics.steps >= 2 * 8  # one at a time: 13 tokens each, 20 fit
    finally:
        engine.close()


def test_cancelled_requests_leave_the_batch_and_the_others_are_unchanged(model):
    engine = Engine(model, base_name="base").start()
    try:
        keep, drop = Collector(), Collector()
        r = _request("prompt", [9, 10, 11], 40)
        engine.submit(_request("lora", [3, 4, 5], 10), keep)
        engine.submit(r, drop)
        drop.wait_tokens(2)
        engine.cancel(r.request_id)
        assert keep.done.wait(60) and keep.tokens == _alone(model, "lora", [3, 4, 5], 10)
        for _ in range(100):
            if engine.metrics.requests["cancelled"]:
                break
            threading.Event().wait(0.05)
        assert engine.metrics.requests["cancelled"] == 1 and not drop.done.is_set() and engine._reserved == 0
    finally:
        engine.close()


@pytest.mark.parametrize("field,kwargs,status", [
    ("model", dict(model_name="nope"), 404),
    ("prompt", dict(ids=[]), 400),
    ("prompt", dict(ids=[1, 97]), 400),
    ("max_tokens", dict(max_tokens=300), 400),
    ("stop", dict(stop=["x"]), 400),
])
def test_bad_requests_are_refused_naming_the_field(model, field, kwargs, status):
    engine = Engine(model, base_name="base")
    args = dict(model_name="lora", ids=[1, 2], max_tokens=4)
    args.update(kwargs)
    with pytest.raises(RequestError) as err:
        engine.submit(_request(args.pop("model_name"), args.pop("ids"), args.pop("max_tokens"), **args), Collector())
    assert err.value.param == field and err.value.status == status


def test_adapters_load_and_unload_between_steps(model, tmp_path):
    model.save_adapter("prefix", tmp_path / "p")
    engine = Engine(model, base_name="base").start()
    try:
        c = Collector()
        engine.submit(_request("lora", [3, 4], 30), c)
        c.wait_tokens(1)
        engine.load_adapter("prefix2", str(tmp_path / "p")).result(60)
        assert "prefix2" in engine.served()
        c2 = Collector()
        engine.submit(_request("prefix2", [5, 6, 7], 5), c2)
        assert c2.done.wait(60) and c2.tokens == _alone(model, "prefix", [5, 6, 7], 5)
        engine.unload_adapter("prefix2").result(60)
        assert "prefix2" not in model.configs
        with pytest.raises(RequestError):
            engine.load_adapter("lora", str(tmp_path / "p")).result(60)
        assert c.done.wait(60) and c.tokens == _alone(model, "lora", [3, 4], 30)
    finally:
        engine.close()


def test_a_prefix_reloaded_under_the_same_name_serves_its_new_weights(model, tmp_path):
    # the engine keeps each prefix mix's stacked banks across steps: a reload must not see the old ones
    other = MultiAdapterModel(tiny_llama()).eval()
    torch.manual_seed(7)
    other.add_adapter("prefix", KINDS["prefix"])
    other.save_adapter("prefix", tmp_path / "new")
    model.save_adapter("prefix", tmp_path / "old")
    engine = Engine(model, base_name="base").start()
    try:
        outs = []
        for d in ("old", "new"):
            engine.load_adapter("p", str(tmp_path / d)).result(60)
            c = Collector()
            engine.submit(_request("p", [5, 6, 7], 6), c)
            assert c.done.wait(60)
            outs.append(c.tokens)
            engine.unload_adapter("p").result(60)
        assert outs[0] == _alone(model, "prefix", [5, 6, 7], 6)
        other_alone = _alone(other, "prefix", [5, 6, 7], 6)
        assert outs[1] == other_alone and outs[1] != outs[0]
    finally:
        engine.close()


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(model, monkeypatch):
    engine = Engine(model, base_name="base").start()
    try:
        real = engine.runner.run
        calls = []

        def once_broken(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(*args)

        monkeypatch.setattr(engine.runner, "run", once_broken)
        broken, fine = Collector(), Collector()
        engine.submit(_request("lora", [3, 4], 4), broken)
        assert broken.done.wait(60) and broken.reason == "error" and "boom" in broken.error
        engine.submit(_request("lora", [3, 4], 4), fine)
        assert fine.done.wait(60) and fine.tokens == _alone(model, "lora", [3, 4], 4)
        assert engine.alive and engine._reserved == 0 and engine.metrics.requests["failed"] == 1
    finally:
        engine.close()
