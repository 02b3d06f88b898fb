"""The helpers the Triton kernel files share (peft_kernels/triton/_common.py), on the CPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from peft_kernels.triton import _common as C  # noqa: E402


def test_index_modes_are_one_numbering():
    modes = {C.MODE_SHARED.value, C.MODE_PER_ROW.value, C.MODE_EXPLICIT.value}
    assert len(modes) == 3
    assert C.index_mode(torch.tensor([0]), 1) == C.MODE_EXPLICIT.value
    assert C.index_mode(None, 1) == C.MODE_SHARED.value
    assert C.index_mode(None, 4) == C.MODE_PER_ROW.value


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_sort_segments_groups_keys_stably(dtype):
    keys = torch.tensor([2, -1, 0, 2, 0, -1, 5, 2], dtype=dtype)  # 5: past the segments
    order, starts = C.sort_segments(keys, 3)
    assert starts.tolist() == [2, 4, 4, 7]
    assert order[starts[0]:starts[1]].tolist() == [2, 4]  # key 0, original order
    assert order[starts[1]:starts[2]].tolist() == []  # key 1: no rows
    assert order[starts[2]:starts[3]].tolist() == [0, 3, 7]
    assert sorted(order[:starts[0]].tolist()) == [1, 5]  # -1 rows first, in no segment


def test_sort_segments_empty():
    order, starts = C.sort_segments(torch.zeros(0, dtype=torch.int64), 2)
    assert order.numel() == 0 and starts.tolist() == [0, 0, 0]


def test_on_tensor_device_passes_calls_through():
    @C.on_tensor_device
    def launcher(x, *, scale=2):
        """doc"""
        return x * scale

    assert launcher.__doc__ == "doc" and launcher.__name__ == "launcher"
    assert torch.equal(launcher(torch.ones(2), scale=3), torch.full((2,), 3.0))
    assert launcher(x=torch.ones(1))[0] == 2  # a tensor passed by keyword
    assert launcher(5) == 10  # no tensor at all


def test_sm_count_without_a_gpu():
    assert C.sm_count(torch.device("cpu")) == 1


def test_device_guard_is_a_no_op_on_cpu():
    with C.device_guard(torch.device("cpu")):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_tensor_device_makes_the_tensor_device_current():
    seen = []

    @C.on_tensor_device
    def launcher(x):
        seen.append(torch.cuda.current_device())

    last = torch.device("cuda", torch.cuda.device_count() - 1)
    launcher(torch.ones(1, device=last))
    assert seen == [last.index]
