"""The Triton kernels built for a GPU on a machine without one (benchmarks/kernel_build.py): every launch the models
make compiles for Hopper through Triton's CUDA backend and ptxas, none spills a register in the dtypes that train
(fp32, bf16, fp16) at the launch shapes a GPU picks, and the build sees a spill where there is one."""

import importlib
import importlib.util

import pytest

from benchmarks.kernel_build import _occupancy, kernel_build, recorded_launches
from modeling_poolformer.rglru import CUDA_BLOCKS
from modeling_poolformer.scan import BLOCK_N_CHOICES

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
KERNELS = {"_rglru_fwd_kernel", "_rglru_bwd_kernel", "_scan_kernel", "_scan_summary_kernel", "_gelu_gate_fwd_kernel",
           "_gelu_gate_bwd_kernel"}


def test_a_triton_path_without_triton_is_refused_before_anything_builds(tmp_path):
    with pytest.raises(ValueError, match="triton_path .* holds no triton package"):
        kernel_build(launches=[], triton_path=str(tmp_path))


def test_occupancy_counts_whole_programs_by_registers_shared_memory_and_warps():
    # 255 registers: 8,192 per warp (256-register units), so two 4-warp programs fill Hopper's 65,536
    assert _occupancy(90, 255, 512, 4) == 8
    # 32 registers: 16 programs of 4 warps, the 64-warp limit
    assert _occupancy(90, 32, 0, 4) == 64
    # shared memory bounds it: one program of 64 KB fits sm_89's 100 KB
    assert _occupancy(89, 32, 65536, 4) == 4
    # and sm_89 holds 48 warps at most
    assert _occupancy(89, 32, 0, 8) == 48


@pytest.fixture(scope="module")
def launches():
    return recorded_launches()


@needs_triton
@pytest.mark.integration
def test_every_launch_builds_for_hopper_without_spilling_in_the_training_dtypes(launches):
    assert {launch["kernel"] for launch in launches} == KERNELS
    # fp64 (the gradchecks' dtype) builds too, see `python -m benchmarks.kernel_build`; left out here for time
    rows = kernel_build(archs=(90,), dtypes={"fp32", "bf16", "fp16"}, launches=launches)
    assert {row["kernel"] for row in rows} == KERNELS
    assert {row["triton"] for row in rows} == {importlib.import_module("triton").__version__}
    for kernel, blocks in (("_rglru_bwd_kernel", {block for block, _ in CUDA_BLOCKS}),
                           ("_scan_kernel", set(BLOCK_N_CHOICES))):
        assert {row["constants"]["BLOCK_N"] for row in rows if row["kernel"] == kernel} == blocks
    # the fused RG-LRU in bf16 autocast (the thesis recipe), complex and real, and its backward were built
    assert {(row["kernel"], row["constants"]["COMPLEX"]) for row in rows if row["dtypes"] == ["bf16", "fp32"]
            and "COMPLEX" in row["constants"]} == {(k, c) for k in ("_rglru_fwd_kernel", "_rglru_bwd_kernel")
                                                   for c in (True, False)}
    spilled = [(row["kernel"], row["dtypes"], row["constants"], row["spill_stores"]) for row in rows
               if row["spill_stores"] or row["spill_loads"]]
    assert spilled == []
    assert all(row["resident_warps"] >= 8 for row in rows)


@needs_triton
@pytest.mark.integration
def test_the_build_reports_the_spills_of_too_wide_a_tile(launches):
    # 32 units on 4 warps (16 of a tile's elements per thread): the backward's launch shape before CUDA_BLOCKS
    rows = kernel_build(archs=(90,), shapes={"_rglru_bwd_kernel": [dict(BLOCK_N=32, num_warps=4)]},
                        kernels={"_rglru_bwd_kernel"}, dtypes={"bf16", "fp32"}, launches=launches)
    complex_rows = [row for row in rows if row["constants"]["COMPLEX"]]
    assert len(complex_rows) == 2 and all(row["registers"] == 255 and row["spill_stores"] > 100 for row in complex_rows)
