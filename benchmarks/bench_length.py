"""5. Time and peak memory of one training step as T grows (B=1, checkpointing on), each point in a fresh
process, with the transformer beside it until it runs out of memory or time."""

import json
import os
import subprocess
import tempfile
import time

import torch

from .common import AUTOCAST, CHILD, DEVICE, ROOT, build_model, peak_gb, poolformer, reset_peak, sync

CHUNK = 16000  # Poolformer's time chunk for checkpointing beyond one chunk (per-block checkpointing below it)


def one_step(kind, length):
    """Child process: one training step (after a warm-up step up to 2^16) of `kind` at B=1, prints its time. Its
    allocator returns every freed tensor of 1 MB or more to the OS (the setting train.py uses for long sequences),
    so the peak RSS is what the step needs, not what a fragmented heap holds on to."""
    if kind == "poolformer":
        model = poolformer(dropout=0.0, activation_checkpointing=True, checkpoint_chunk_size=CHUNK)
    else:
        model, _ = build_model("GPT-2", length)
        model.activation_checkpointing_enable()
    model.to(DEVICE).train()
    ids = torch.randint(0, 256, (1, length), device=DEVICE)
    times = []
    reset_peak()
    for _ in range(2 if length <= 2**16 else 1):
        sync()
        start = time.perf_counter()
        with AUTOCAST:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": min(times), "gpu_peak_gb": peak_gb()}))


def measure_step(kind, length, timeout):
    """Runs `one_step` in a child and reads its peak RSS from wait4 (ru_maxrss is in KB on Linux)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*CHILD, "step", kind, str(length)], cwd=ROOT, stdout=out,
                                stderr=err, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                _, _, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"status": f"over {timeout} s", "peak_gb": usage.ru_maxrss / 1e6}
            time.sleep(0.2)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = usage.ru_maxrss / 1e6
    if code != 0:
        oom = code == -9 or "memory" in stderr.lower()
        return {"status": "out of memory" if oom else stderr.strip()[-200:], "peak_gb": peak}
    row = json.loads(stdout.strip().splitlines()[-1])
    if DEVICE == "cuda":  # the GPU's peak, not the host process's
        peak = row["gpu_peak_gb"]
    return {"status": "ok", "peak_gb": peak, **row}


def bench_length(quick):
    top = 16 if quick else 20
    rows, transformer_alive = [], True
    for exp in range(12, top + 1):
        length = 2**exp
        row = {"length": length, "poolformer": measure_step("poolformer", length, timeout=1500)}
        if transformer_alive:
            row["gpt2"] = measure_step("gpt2", length, timeout=300)
            transformer_alive = row["gpt2"]["status"] == "ok"
        rows.append(row)
        print(f"  T=2^{exp}: {row}", flush=True)
    return {"rows": rows}
