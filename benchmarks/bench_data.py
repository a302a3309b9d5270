"""6. The data layer at scale: start-up (cold and cached index) and peak RSS for synthetic folders of 1,000 and
20,000 one-second files; train.py's memory on parquet folders of one-second clips (`clips`: 6,000 to 90,000 by
default; 4 files of 3 row groups each), cold and warm and streamed, the peak RssAnon and RssFile of the training
process and of its children sampled from /proc (`rss.py`); a 1-s window of a 1-hour file against a 1-s file's
decode, and loader tokens/s (0 and 4 workers, map-style and streamed) next to the SC09 model's training tokens/s."""

import io
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from modeling_poolformer import PoolformerConfig

from .common import ROOT, SC09, poolformer, run_child

RATE = 16000


def make_folder(folder: Path, n: int, seconds: float = 1.0) -> Path:
    if (folder / ".done").exists():
        return folder
    rng = np.random.default_rng(n)
    clip = (rng.uniform(-0.5, 0.5, int(seconds * RATE)) * 32767).astype(np.int16)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        soundfile.write(sub / f"{i:06d}.wav", np.roll(clip, i), RATE, subtype="PCM_16")
    (folder / ".done").touch()
    return folder


def make_parquet(folder: Path, n: int, files: int = 4, row_groups: int = 0) -> Path:
    """`n` one-second clips (WAV bytes) in `files` parquet files as a Hub dataset has them, with `row_groups` row
    groups per file (0: datasets' own writer, 100 rows each), written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Audio, Features

    if (folder / ".done").exists():
        return folder
    rng = np.random.default_rng(1)
    clip = (rng.uniform(-0.5, 0.5, RATE) * 32767).astype(np.int16)
    schema = Features({"audio": Audio(decode=False)}).arrow_schema
    (folder / "data").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for k in range(files):  # four parquet shards, as a Hub dataset has them
        rows = range(bounds[k], bounds[k + 1])
        group = -(-len(rows) // row_groups) if row_groups else 100
        with pq.ParquetWriter(str(folder / "data" / f"train-{k:05d}-of-{files:05d}.parquet"), schema) as writer:
            for first in range(rows.start, rows.stop, group):
                audio = []
                for i in range(first, min(first + group, rows.stop)):
                    buf = io.BytesIO()
                    soundfile.write(buf, np.roll(clip, i), RATE, format="WAV", subtype="PCM_16")
                    audio.append({"bytes": buf.getvalue(), "path": f"{i:06d}.wav"})
                writer.write_table(pa.table({"audio": audio}, schema=schema), row_group_size=group)
    (folder / ".done").touch()
    return folder


def child_startup(folder: str, cache: str, mode: str):
    """One launch's data start-up in a fresh process: seconds, peak RSS over the process's RSS after imports."""
    from training.data import DataArguments, build_datasets

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    _, _, sets = build_datasets(DataArguments(dataset=folder, cache_dir=cache, mode=mode, seq_len=16000),
                                PoolformerConfig())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rss_growth_mb": peak - base,
                      "items": sum(len(s) for s in sets.values())}))


def train_memory(folder: Path, work: Path, streaming: bool = False, runs=("cold", "warm"), max_steps: int = 1) -> list:
    """Peak RssAnon and RssFile (MB) of `train.py` (tiny model, `max_steps` steps) on `folder` and of its children
    (index and DataLoader workers), sampled from /proc every 0.2 s: a cold start (fresh dataset cache and index
    cache: `load_dataset` converts the parquet, the index is built), then a warm one (both read back). "start-up"
    is up to the end of set-up (splits, index, model), "training" the rest; "all" the whole run."""
    import os

    from .rss import run_sampled

    cache = work / "train_cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(cache / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    rows = []
    for run in runs:
        out = work / "train_out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--model_config", str(ROOT / "hub_configs" / "tiny"),
               "--dataset", str(folder), "--cache_dir", str(cache), "--output_dir", str(out),
               "--max_steps", str(max_steps), "--max_eval_batches", "1", "--batch_size", "1", "--log_with", "none",
               "--num_samples", "1", "--sample_seconds", "0.01"]
        if streaming:
            cmd += ["--streaming"]
        r = run_sampled(cmd, env=env, phases={"training": "optimizer steps"}, timeout=3600)
        if r["returncode"] != 0:
            rows.append({"run": run, "error": r["tail"][-1][-200:] if r["tail"] else f"exit {r['returncode']}"})
            continue
        rows.append({"run": "streamed" if streaming else run, "seconds": r["seconds"],
                     "children": r["children_seen"],
                     **{f"{phase}_{who}_{k}": v for phase in ("all", "start", "training") for who in
                        ("root", "child", "children") for k, v in r.get(phase, {}).get(who, {}).items()}})
    shutil.rmtree(work / "train_out", ignore_errors=True)
    return rows


def item_seconds(dataset, rows, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in rows:
            dataset[i]
        best = min(best, (time.perf_counter() - start) / len(rows))
    return best


def loader_tokens_per_s(dataset, workers, batches=40, batch_size=8):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         shuffle=not isinstance(dataset, torch.utils.data.IterableDataset))
    it = iter(loader)
    next(it)  # workers started, first batch in
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(next(it)["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def bench_data(quick: bool, clips=None) -> dict:
    from training.data import AudioSpec, AudioTokenDataset, DataArguments, build_datasets, load_splits

    from .bench_train import train_tokens_per_s

    work = ROOT / "benchmarks" / "data_cache"
    sizes = (1000, 20000)
    out = {"startup": []}
    for n in sizes:
        folder = make_folder(work / f"folder_{n}", n)
        cache = work / f"cache_{n}"
        shutil.rmtree(cache, ignore_errors=True)
        for run in ("cold", "cached"):
            r = run_child(["data", folder, cache, "pad"], timeout=1800)
            out["startup"].append({"source": f"folder, {n:,} files", "run": run, **r})
    out["train_memory"] = []
    for n in clips if clips is not None else ((6000,) if quick else (6000, 30000, 90000)):
        parquet = make_parquet(work / f"parquet_{n}", n, row_groups=3)
        size = sum(p.stat().st_size for p in (parquet / "data").glob("*.parquet"))
        for streaming in (False, True):
            for r in train_memory(parquet, work, streaming=streaming, runs=("streamed",) if streaming else
                                  ("cold", "warm")):
                out["train_memory"].append({"clips": n, "parquet_mb": size / 2**20, **r})
    small = {r["source"]: r for r in out["startup"] if r["run"] == "cached"}
    rss = [small[f"folder, {n:,} files"]["peak_rss_mb"] for n in sizes]
    out["rss_growth_1k_to_20k_mb"] = rss[1] - rss[0]
    out["cached_startup_20k_s"] = small["folder, 20,000 files"]["seconds"]

    # a 1-s window of a 1-hour file vs a 1-s file
    hour = work / "hour"
    if not (hour / "train" / "hour.wav").exists():
        (hour / "train").mkdir(parents=True, exist_ok=True)
        make_folder(hour / "validation", 2)
        rng = np.random.default_rng(0)
        with soundfile.SoundFile(hour / "train" / "hour.wav", "w", RATE, 1, subtype="PCM_16") as f:
            for _ in range(60):
                f.write((rng.uniform(-0.5, 0.5, 60 * RATE) * 32767).astype(np.int16))
    spec = AudioSpec(seq_len=RATE, mode="window")
    _, hour_splits = load_splits(str(hour), cache_dir=str(work / "cache_hour"))
    long = AudioTokenDataset(hour_splits["train"], spec, cache_dir=str(work / "cache_hour"))
    _, clip_splits = load_splits(str(work / "folder_1000"), cache_dir=str(work / "cache_1000"))
    clips = AudioTokenDataset(clip_splits["train"], spec, cache_dir=str(work / "cache_1000"))
    rows = np.random.default_rng(0).choice(len(long), 50, replace=False)
    out["window"] = {"hour_file_windows": len(long), "window_of_hour_ms": 1e3 * item_seconds(long, rows),
                     "one_s_file_ms": 1e3 * item_seconds(clips, range(50))}
    out["window"]["ratio"] = out["window"]["window_of_hour_ms"] / out["window"]["one_s_file_ms"]

    # loader throughput vs training
    folder = str(work / "folder_20000")
    out["loader"] = []
    for streaming in (False, True):
        args = DataArguments(dataset=folder, cache_dir=str(work / "cache_20000"), streaming=streaming,
                             shuffle_buffer=64, seq_len=RATE, mode="pad")
        _, _, sets = build_datasets(args, PoolformerConfig())
        for workers in (0, 4):
            tps = loader_tokens_per_s(sets["train"], workers, batches=10 if quick else 40)
            out["loader"].append({"kind": "streamed" if streaming else "map-style", "workers": workers,
                                  "tokens_per_s": tps})
    model = poolformer(SC09)
    train_tps, step_s, _ = train_tokens_per_s(model, 2 if quick else 4, RATE, repeats=1)
    out["train_tokens_per_s"] = train_tps
    best4 = min(r["tokens_per_s"] for r in out["loader"] if r["workers"] == 4)
    out["loader_4_workers_over_training"] = best4 / train_tps
    out["targets"] = {
        **memory_targets(out["train_memory"]),
        "rss growth 1k->20k files < 100 MB": out["rss_growth_1k_to_20k_mb"] < 100,
        "cached start-up of 20k files < 5 s": out["cached_startup_20k_s"] < 5,
        "1-s window of a 1-h file within 3x a 1-s file": out["window"]["ratio"] <= 3,
        "loader (4 workers) >= 10x training tokens/s": out["loader_4_workers_over_training"] >= 10,
    }
    return out


def memory_targets(rows: list) -> dict:
    """Per dataset size: a cold start's peak RssAnon of the training process within 150 MB of the warm start's
    (start-up and whole run), its RssFile while training under 400 MB, and a streamed run's whole-run RssAnon within
    150 MB of the warm map-style run's."""
    ok = {"cold start-up RssAnon <= warm + 150 MB": [], "cold whole-run RssAnon <= warm + 150 MB": [],
          "RssFile while training < 400 MB (cold, warm, streamed)": [],
          "streamed whole-run RssAnon <= warm map-style + 150 MB": []}
    for n in sorted({r["clips"] for r in rows}):
        runs = {r["run"]: r for r in rows if r["clips"] == n and "error" not in r}
        cold, warm, streamed = runs.get("cold"), runs.get("warm"), runs.get("streamed")
        if cold and warm:
            ok["cold start-up RssAnon <= warm + 150 MB"].append(
                cold["start_root_anon_mb"] <= warm["start_root_anon_mb"] + 150)
            ok["cold whole-run RssAnon <= warm + 150 MB"].append(
                cold["all_root_anon_mb"] <= warm["all_root_anon_mb"] + 150)
        if streamed and warm:
            ok["streamed whole-run RssAnon <= warm map-style + 150 MB"].append(
                streamed["all_root_anon_mb"] <= warm["all_root_anon_mb"] + 150)
        ok["RssFile while training < 400 MB (cold, warm, streamed)"] += [
            r.get("training_root_file_mb", float("inf")) < 400 for r in runs.values()]
        ok["RssFile while training < 400 MB (cold, warm, streamed)"] += [False] * (3 - len(runs))  # a failed run
    return {k: bool(v) and all(v) for k, v in ok.items()}
