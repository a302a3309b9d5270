"""The benchmark's measuring instruments against a model whose answers are known by hand: the bytes a training step
saves for the backward pass, writes and holds at once (section 8), the profile of a step, and the fused RG-LRU's
timing against the bytes its kernels must move (section 1)."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks.bench_scan import LAUNCH_SHAPES, bench_fused_rglru, fused_rglru_bytes
from benchmarks.bench_train import profile_step, step_traffic
from benchmarks.report import fused_rglru_table


class _Square(torch.nn.Module):
    """loss = sum(x * x), x = Embedding(ids) of width 16: every tensor's size is known."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(256, 16)

    def forward(self, input_ids, labels):
        x = self.emb(input_ids)
        return SimpleNamespace(loss=(x * x).sum())


@pytest.mark.parametrize("length", [1000, 3000])
def test_step_traffic_counts_what_a_step_saves_writes_and_holds(length):
    r = step_traffic(_Square(), 2, length)
    # saved: x for the product's backward (16 fp32, once though both operands read it) and the ids for the
    # embedding's (one int64); the embedding's weight is a parameter, left out
    assert r["saved_kb_per_token"] == pytest.approx((16 * 4 + 8) / 1e3)
    assert r["saved_tensors"] == 2
    # written per token: x, x * x, the product's two gradients (g x, x g) and their sum, 16 fp32 each
    assert r["written_by_op_kb"]["mul.Tensor"] == pytest.approx(3 * 64 / 1e3)
    assert r["written_by_op_kb"]["embedding"] == r["written_by_op_kb"]["add.Tensor"] == pytest.approx(64 / 1e3)
    # the weight's gradient, (256, 16) fp32, whatever the length
    assert r["written_by_op_kb"]["embedding_dense_backward"] * 2 * length == pytest.approx(256 * 16 * 4 / 1e3)
    # held at once, at most: x and the product's two gradients before they are added (x * x is freed by then)
    assert r["peak_kb_per_token"] == pytest.approx(3 * 64 / 1e3, rel=1e-3)


def test_profile_step_lists_the_ops_by_time():
    r = profile_step(_Square(), 2, 1000, top=3)
    assert 0 < len(r["top"]) <= 3 and r["launches"] >= 5 and r["wall_s"] > 0
    times = [op["ms"] for op in r["top"]]
    assert times == sorted(times, reverse=True) and 0 < sum(op["share"] for op in r["top"]) <= 1 + 1e-9


def test_the_fused_rglru_bytes_are_its_kernels_inputs_and_outputs():
    # per (B, T, W) element, bf16 x: x read twice, the output written, its gradient read (2 bytes each); x's gradient
    # and the gate pre-activations' written in fp32 (4 bytes each)
    assert fused_rglru_bytes(2, 3, 256, 2) == 2 * 3 * 256 * (2 + 2 + 2 + 2 + 4 + 4)
    assert fused_rglru_bytes(1, 1, 1, 4) == 24


def test_the_fused_rglru_section_times_the_op_against_that_bound_and_the_composite():
    r = bench_fused_rglru(1, 300)
    assert (r["width"], r["dtype"]) == (256, "float32")  # the sc09 layer's, in the CPU's training dtype
    assert r["bound_s"] == pytest.approx(fused_rglru_bytes(1, 300, 256, 4) / (r["bandwidth_gb_s"] * 1e9))
    assert [row["implementation"] for row in r["rows"]] == ["fused op (numba)"]
    for row in r["rows"]:
        assert row["seconds"] > 0 and row["over_bound"] == pytest.approx(row["seconds"] / r["bound_s"])
    assert r["composite_over_fused"] == pytest.approx(r["recurrence_composite_s"] / r["recurrence_fused_s"])
    assert "| fused op (numba) |" in "\n".join(fused_rglru_table(r))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_fused_rglru_section_sweeps_the_launch_shapes():
    r = bench_fused_rglru(2, 300, sweep=True)
    assert [row["implementation"] for row in r["rows"]] == [
        f"fused op, {block} units on {warps} warps" for block, warps in LAUNCH_SHAPES]
