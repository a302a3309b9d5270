"""The Triton kernels built for NVIDIA GPUs on a machine without one: registers, spills and occupancy per launch.

    python -m benchmarks.kernel_build [--arch 80,89,90] [--out benchmarks/results/kernel_build.md] [--triton_path DIR]

Two steps, each in its own process:
1. record: the real launchers (`fused_rglru`, `linear_scan`, `gelu_gate`, forward and backward, in every dtype the
   models use) run small inputs in Triton's interpreter, and each kernel launch is recorded: its argument types and
   compile-time values;
2. build: each recorded launch, with the launch shapes a GPU picks instead of the interpreter's (`rglru.CUDA_BLOCKS`,
   `scan.BLOCK_N_CHOICES`), is compiled ahead of time by Triton's CUDA backend and ptxas for each architecture, and
   ptxas' report is read: registers per thread, bytes spilled to local memory, stack frame, shared memory; with the
   warps per multiprocessor that fit at once (occupancy, from the registers, shared memory and warps per program).

A kernel that fails to build here fails on a GPU, and a spill here is a spill there: registers stored to and loaded
from local memory on every tile, which turns a latency-bound scan into a memory-bound one. Triton releases allocate
registers differently, so `--triton_path` builds with another release than this environment's, installed in DIR
(`pip install --no-deps --target DIR triton==3.6.0`: the one a GPU's torch carries); the launches are still recorded
with this environment's interpreter.
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

# (registers per multiprocessor, shared memory per multiprocessor in bytes, most resident warps) per architecture:
# A100 (sm_80), Ada (sm_89: L4, RTX 4090), Hopper (sm_90: H100, H200)
ARCHITECTURES = {80: (65536, 167936, 64), 89: (65536, 102400, 48), 90: (65536, 233472, 64)}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # compile options, not kernel arguments
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}


def gpu_shapes() -> dict:
    """Per kernel, the launch values a GPU picks from where the interpreter's differ."""
    from modeling_poolformer import rglru, scan

    rglru_shapes = [dict(BLOCK_N=block, num_warps=warps) for block, warps in rglru.CUDA_BLOCKS]
    scan_shapes = [dict(BLOCK_N=block) for block in scan.BLOCK_N_CHOICES]
    return {"_rglru_fwd_kernel": rglru_shapes, "_rglru_bwd_kernel": rglru_shapes,
            "_scan_kernel": scan_shapes, "_scan_summary_kernel": scan_shapes}


# ---------------------------------------------------------------------------------------------------------------------
# 1. record (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------------


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ["pointer", TRITON_TYPES[value.dtype]]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    raise TypeError(f"kernel_build: cannot record a kernel argument of type {type(value).__name__}")


def _drive():
    """The launches the models make, at small sizes (kernels are specialised on dtypes, flags, block shapes and
    whether sizes divide by 16, which these do as the models' do): the RG-LRU with the models' gate blocks of 8 inputs
    (to 4 complex or 8 real units), the scan forward and backward over two tiles, in one and in two time chunks, the GELU gate."""
    from modeling_poolformer import linear_scan
    from modeling_poolformer.gelu_gate import gelu_gate, gelu_gate_backward
    from modeling_poolformer.rglru import CHECKPOINT, fused_rglru
    from modeling_poolformer.scan import triton_scan

    g = torch.Generator().manual_seed(0)
    steps, blocks, width = CHECKPOINT, 4, 32
    for is_complex in (True, False):
        units = width // 2 if is_complex else width
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            params = [torch.randn(blocks, 8, units // blocks, generator=g), torch.zeros(units),
                      torch.randn(blocks, 8, units // blocks, generator=g), torch.zeros(units),
                      torch.randn(units, generator=g), torch.randn(units, generator=g) if is_complex else None]
            params = [p if p is None else p.to(acc).requires_grad_() for p in params]
            x = torch.randn(1, steps, width, generator=g).to(dtype).requires_grad_()
            out, last = fused_rglru(x, *params, None, 8.0, 1000.0, dtype, implementation="triton")
            torch.autograd.backward((out, last), (torch.randn_like(out), torch.randn_like(last)))
        for dtype in ((torch.complex64, torch.complex128) if is_complex else (torch.float32, torch.float64)):
            a = (torch.rand(1, 2 * steps, 16, generator=g, dtype=torch.float64) * 0.9).to(dtype).requires_grad_()
            u = torch.randn(1, 2 * steps, 16, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            linear_scan(a, u, implementation="triton").abs().sum().backward()
            triton_scan(a.detach(), u.detach(), torch.zeros_like(u[:, 0]), time_chunks=2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        b, gate, grad = (torch.randn(64, generator=g).to(dtype) for _ in range(3))
        for approximate in ("tanh", "none"):
            gelu_gate(b, gate, approximate, "triton")
            gelu_gate_backward(grad, b, gate, approximate, "triton")


def record() -> list:
    """Every kernel launch `_drive` makes, deduplicated: {module, kernel, arguments: {name: [kind, value]}}."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel_build.record runs the launchers in Triton's interpreter: set TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = {}, InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        arguments = {name: _describe(value) for name, value in zip(self.arg_names, args)}
        arguments.update({name: _describe(value) for name, value in kwargs.items()})
        launch = {"module": self.fn.__module__, "kernel": self.fn.__name__, "arguments": arguments}
        launches.setdefault(_key(launch), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        _drive()
    finally:
        InterpretedFunction.run = run
    return list(launches.values())


def _key(launch: dict) -> str:
    """A launch's identity: its kernel and every argument's type and compile-time value (not the sizes)."""
    kinds = {name: kind if kind in ("int", "float") else [kind, value] for name, (kind, value) in
             launch["arguments"].items()}
    return json.dumps([launch["kernel"], kinds], sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------------
# 2. build (Triton's compiler, no TRITON_INTERPRET)
# ---------------------------------------------------------------------------------------------------------------------


def _occupancy(arch: int, registers: int, shared: int, warps: int) -> int:
    """Warps resident per multiprocessor: registers are allocated per warp in units of 256, programs are whole."""
    register_file, shared_memory, most_warps = ARCHITECTURES[arch]
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(register_file // (per_warp * warps), shared_memory // shared if shared else 32, most_warps // warps,
                   32)
    return programs * warps


def build_launch(launch: dict, arch: int) -> dict:
    """Compile one recorded launch for sm_`arch` and read ptxas' report."""
    from triton import __version__ as triton_version
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    options = {name: value for name, (_, value) in launch["arguments"].items() if name in LAUNCH_OPTIONS}
    signature, constants, attributes = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        kind, value = launch["arguments"][name]
        if kernel.params[index].is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif kind == "pointer":  # torch's allocations are 16-byte aligned, which the JIT assumes as well
            signature[name], attributes[(index,)] = "*" + value, [["tt.divisibility", 16]]
        elif kind == "int":
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = {"float": "fp32", "bool": "i1"}[kind]
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cached build would skip ptxas and its report
        compiled = triton_compile(ASTSource(kernel, signature, constants, attributes),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    report = log.getvalue()

    def number(pattern):
        found = re.search(pattern, report)
        if found is None:
            raise RuntimeError(f"kernel_build: no '{pattern}' in ptxas' report for {launch['kernel']}:\n{report}")
        return int(found.group(1))

    warps = options.get("num_warps", 4)
    row = {"arch": arch, "kernel": launch["kernel"], "triton": triton_version, "warps": warps,
           "registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
           "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame"),
           "shared": compiled.metadata.shared,
           "dtypes": sorted({value for kind, value in launch["arguments"].values() if kind == "pointer"}),
           "constants": constants}
    row["resident_warps"] = _occupancy(arch, row["registers"], row["shared"], warps)
    return row


def _build_args(args):
    return build_launch(*args)


def build_all(launches: list, archs, shapes: dict) -> list:
    """Every launch at every GPU launch shape of `shapes` (the recorded one where none is given), per architecture,
    compiled in parallel."""
    jobs = []
    for arch in archs:
        for launch in launches:
            for shape in shapes.get(launch["kernel"], [{}]):
                arguments = dict(launch["arguments"], **{name: _describe(value) for name, value in shape.items()})
                jobs.append((dict(launch, arguments=arguments), arch))
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(_build_args, jobs))


# ---------------------------------------------------------------------------------------------------------------------
# Both steps, each in its own process (the interpreter replaces Triton's JIT when the modules are imported)
# ---------------------------------------------------------------------------------------------------------------------


def _run_step(step: str, env: dict, payload: dict) -> object:
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernel_build", "--step", step],
                            input=json.dumps(payload), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"kernel_build: the {step} step failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


def recorded_launches() -> list:
    """`record()`, in a process of its own with Triton's interpreter on."""
    return _run_step("record", dict(_env(), TRITON_INTERPRET="1"), {})


def kernel_build(archs=(90,), shapes=None, kernels=None, dtypes=None, launches=None, triton_path=None) -> list:
    """ptxas' report (see `build_launch`) for every launch the models make (`launches`, recorded if None) on each
    architecture in `archs`; `shapes` replaces `gpu_shapes()`, `kernels` keeps those kernels only and `dtypes` the
    launches whose tensors are all of those Triton dtypes ("fp32", "bf16", ...); built by the Triton installed in
    `triton_path` if given."""
    launches = recorded_launches() if launches is None else launches
    launches = [launch for launch in launches if (kernels is None or launch["kernel"] in kernels) and (
        dtypes is None or all(value in dtypes for kind, value in launch["arguments"].values() if kind == "pointer"))]
    env = _env()
    if triton_path is not None:
        if not os.path.isfile(os.path.join(triton_path, "triton", "__init__.py")):
            raise ValueError(f"kernel_build: triton_path {triton_path!r} holds no triton package "
                             "(install one there with `pip install --no-deps --target DIR triton==X`)")
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(triton_path), env["PYTHONPATH"]])
    return _run_step("build", env, {"launches": launches, "archs": list(archs), "shapes": shapes})


def _variant(row: dict) -> str:
    flags = [name.lower() for name, value in row["constants"].items() if value is True and name != "FP64"]
    return "/".join(row["dtypes"]) + (" " + ",".join(flags) if flags else "")


def table(rows: list) -> str:
    lines = ["| arch | kernel | dtypes, flags | units per program | warps | registers | spilled (stores/loads) | "
             "stack | shared | resident warps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["arch"], r["kernel"], _variant(r), -r["constants"].get("BLOCK_N", 0))):
        block = row["constants"].get("BLOCK_N", row["constants"].get("BLOCK", ""))
        lines.append(f"| sm_{row['arch']} | {row['kernel']} | {_variant(row)} | {block} | {row['warps']} | "
                     f"{row['registers']} | {row['spill_stores']} / {row['spill_loads']} B | {row['stack']} B | "
                     f"{row['shared']} B | {row['resident_warps']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,89,90", help="compute capabilities, e.g. 80,89,90")
    parser.add_argument("--out", default="benchmarks/results/kernel_build.md",
                        help="the table goes here too, and the rows as JSON beside it (.json)")
    parser.add_argument("--triton_path", default=None,
                        help="build with the Triton installed in this folder (pip install --target) instead")
    parser.add_argument("--step", choices=("record", "build"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step == "record":
        print(json.dumps(record()))
        return
    if args.step == "build":
        payload = json.loads(sys.stdin.read())
        shapes = payload["shapes"] if payload["shapes"] is not None else gpu_shapes()
        print(json.dumps(build_all(payload["launches"], payload["archs"], shapes)))
        return
    rows = kernel_build(tuple(int(arch) for arch in args.arch.split(",")), triton_path=args.triton_path)
    spilled = [row for row in rows if (row["spill_stores"] or row["spill_loads"]) and "fp64" not in row["dtypes"]]
    command = f"python -m benchmarks.kernel_build --arch {args.arch}" + (
        f" --triton_path <Triton {rows[0]['triton']}>" if args.triton_path else "")
    text = (f"Triton {rows[0]['triton']}, `{command}`\n\n{table(rows)}\n\n"
            f"{len(rows)} kernel builds; {len(spilled)} of those in fp32/bf16/fp16 spill registers\n")
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for path, content in ((args.out, text), (os.path.splitext(args.out)[0] + ".json", json.dumps(rows, indent=1))):
        with open(path + ".tmp", "w") as f:
            f.write(content)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
