"""Backend selection, forcing, and parity of every CPU kernel backend with the reference."""
import pytest
import torch

import peft_kernels as pk
from cases import CASES, call_public
from conftest import kernel_backends, tolerances
from peft_kernels import _ext
from peft_kernels.ops import _dispatch

CPU = torch.device("cpu")


def _parity_params():
    for op, make in CASES.items():
        for backend in kernel_backends(op):
            if backend == "triton":
                continue  # tests/triton runs the interpreter against the reference
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for cid, args in make(dtype):
                    yield pytest.param(op, backend, args, id=f"{op}-{backend}-{dtype}-{cid}".replace("torch.", ""))


@pytest.mark.parametrize("op,backend,args", list(_parity_params()))
def test_kernel_backend_matches_reference(op, backend, args):
    with pk.use_backend(backend):
        got = call_public(op, args)
        assert pk.last_backend(op) == backend
    want = getattr(pk.reference, op)(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)  # the reference's prefix_attention also returns the lse
    assert len(got) <= len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerances(w.dtype))


def test_cpp_backend_is_built_and_picked_automatically_on_cpu():
    assert _ext.CPU.loaded, f"csrc/cpu extension did not load: {_ext.CPU.error}"
    assert _dispatch.status("cpu")["cpp"][0]
    args = CASES["soft_prompt_embed"]()[0][1]
    with pk.use_backend(None):
        call_public("soft_prompt_embed", args)
    assert pk.last_backend("soft_prompt_embed") == "cpp"


def test_forced_backend_via_environment(monkeypatch):
    args = CASES["soft_prompt_embed"]()[0][1]
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "reference")
    call_public("soft_prompt_embed", args)
    assert pk.last_backend("soft_prompt_embed") == "reference"


def test_unknown_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "fastest")
    with pytest.raises(pk.BackendUnavailableError, match="'fastest' is not a backend"):
        call_public("soft_prompt_concat", CASES["soft_prompt_concat"]()[0][1])
    with pytest.raises(ValueError, match="unknown backend"):
        with pk.use_backend("fastest"):
            pass


def test_forcing_a_backend_that_cannot_run_here_is_an_error(monkeypatch):
    args = CASES["multi_lora"]()[0][1]
    with pytest.raises(pk.BackendUnavailableError, match="'cuda' forced but unavailable"):
        with pk.use_backend("cuda"):
            call_public("multi_lora", args)
    monkeypatch.setattr(_ext, "CPU", _ext.Extension("_C", error="ImportError: pretend it failed"))
    with pytest.raises(pk.BackendUnavailableError, match="pretend it failed"):
        with pk.use_backend("cpp"):
            call_public("multi_lora", args)


def test_forced_backend_without_kernel_for_op_uses_next_in_order(monkeypatch):
    args = CASES["soft_prompt_concat"]()[0][1]
    monkeypatch.delitem(_dispatch._KERNELS["soft_prompt_concat"], "cpp", raising=False)  # restored afterwards
    monkeypatch.setattr(_dispatch, "_SELECTED", {})
    with pk.use_backend("cpp"):
        call_public("soft_prompt_concat", args)
    assert pk.last_backend("soft_prompt_concat") == "reference"


def test_unsupported_shape_falls_back(monkeypatch):
    calls = []
    monkeypatch.setitem(_dispatch._KERNELS["soft_prompt_concat"], "cpp",
                        _dispatch.Kernel(lambda *a: calls.append(a), supports=lambda *a: "never"))
    monkeypatch.setattr(_dispatch, "_SELECTED", {})
    with pk.use_backend("cpp"):
        call_public("soft_prompt_concat", CASES["soft_prompt_concat"]()[0][1])
    assert not calls and pk.last_backend("soft_prompt_concat") == "reference"


def test_info_reports_every_backend_with_reason():
    data = pk.info()
    for dev in ("cpu", "cuda"):
        assert set(data["backends"][dev]) == set(pk.BACKENDS)
        for ok, why in data["backends"][dev].values():
            assert isinstance(ok, bool) and why
    assert data["backends"]["cpu"]["reference"][0] and data["backends"]["cpu"]["cpp"][0]
    assert "soft_prompt_embed" in data["kernels"]["cpp"]
