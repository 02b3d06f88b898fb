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


def _lora_args(T=3, N=5, H=8, R=4):
    g = torch.Generator().manual_seed(0)
    x, base = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    a, b = torch.randn(T, R, H, generator=g), torch.randn(T, H, R, generator=g)
    index = torch.tensor([0, 2, -1, 1, 2], dtype=torch.int32)
    return x, a, b, index, torch.rand(T, generator=g), torch.tensor([4, 1, 3], dtype=torch.int32), base


def test_every_native_cpu_kernel_has_a_plain_function_and_cpp_runs_it():
    natives = [n for n in dir(torch.ops.peft_kernels) if n.endswith(("_fwd", "_bwd"))
               and torch._C._dispatch_has_kernel_for_dispatch_key(f"peft_kernels::{n}", "CPU")]
    assert natives
    missing = [n for n in natives if not callable(getattr(_ext.CPU.module, n, None))]
    assert not missing, f"CPU kernels without a plain function in peft_kernels._C (PK_DIRECT_CALL): {missing}"
    assert _dispatch.kernels("multi_lora")["cpp"].fn is _ext.CPU.module.multi_lora_fwd
    args = _lora_args()
    torch.testing.assert_close(_ext.CPU.module.multi_lora_fwd(*args), torch.ops.peft_kernels.multi_lora_fwd(*args),
                               rtol=0, atol=0)


def test_the_plain_function_raises_the_kernels_message_without_a_cpp_backtrace():
    x, a, b, index, scaling, ranks, base = _lora_args()
    with pytest.raises(RuntimeError, match=r"adapter_index\[1\] = 7 is out of range") as err:
        _ext.CPU.module.multi_lora_fwd(x, a, b, torch.tensor([0, 7, 0, 0, 0], dtype=torch.int32), scaling, ranks,
                                       base)
    assert "Exception raised from" not in str(err.value)


def test_eager_inference_under_a_dispatch_mode_goes_through_the_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _lora_args()
    want = pk.multi_lora(*args[:5], ranks=args[5], base=args[6])
    with torch.inference_mode():
        torch.testing.assert_close(pk.multi_lora(*args[:5], ranks=args[5], base=args[6]), want)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t) for t in args]
            out = pk.multi_lora(*fake[:5], ranks=fake[5], base=fake[6], validate=False)
    assert out.shape == want.shape and type(out).__name__ == "FakeTensor"
