"""benchmarks/_matmul_floor.py: the products it records are the step's own (FLOPs equal to
FlopCounterMode's, backward included, transposed operands kept), and each replays on its strides."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_matmul_floor", ROOT / "benchmarks" / "_matmul_floor.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_matmul_floor"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_recorded_products_are_the_steps_flops_forward_and_backward() -> None:
    mf = _module()
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(64, 32), torch.randn(10, 64, requires_grad=True)

    def step() -> None:
        y = lin(x).view(2, 5, 32)
        torch.bmm(y, y.transpose(1, 2)).sum().backward()

    with FlopCounterMode(display=False) as fc:
        step()
    res = mf.floor(step, reps=2)
    assert res["flops"] == fc.get_total_flops() > 0
    ops = sorted((r["op"], r["count"]) for r in res["products"])
    # forward: addmm (bias) + bmm; backward: two mm for the Linear (input and weight grads) + two bmm
    assert ops == [("addmm", 1), ("bmm", 1), ("bmm", 1), ("bmm", 1), ("mm", 1), ("mm", 1)]
    addmm = next(r for r in res["products"] if r["op"] == "addmm")
    assert addmm["sizes"] == [[10, 64], [64, 32]] and addmm["transposed"] == [False, True]  # x @ W.t(): W kept transposed
    assert res["seconds"] == sum(r["seconds"] for r in res["products"]) > 0
    assert res["fused_not_replayed"] == {}


def test_counts_repeat_shapes_and_replays_broadcast_operands() -> None:
    mf = _module()
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    wide = torch.randn(1, 4, 16).expand(3, 4, 16)  # stride 0 on the batch: replay must not copy into it

    def step() -> None:
        for _ in range(3):
            a @ b
        torch.bmm(wide, torch.randn(3, 16, 2))

    res = mf.floor(step, reps=1)
    by_op = {r["op"]: r for r in res["products"]}
    assert by_op["mm"]["count"] == 3 and by_op["mm"]["flops"] == 3 * 2 * 8 * 16 * 4
    assert by_op["bmm"]["flops"] == 2 * 3 * 4 * 16 * 2


def test_fused_attention_is_reported_not_replayed() -> None:
    mf = _module()
    q = torch.randn(1, 2, 8, 16)
    res = mf.floor(lambda: F.scaled_dot_product_attention(q, q, q), reps=1)
    assert res["fused_not_replayed"] and all("scaled_dot_product" in k for k in res["fused_not_replayed"])
