"""The results as Markdown tables (`results.md`)."""

import math

from .bench_generate import PEERS
from .bench_length import CHUNK


def gb(x):
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def cuda_generation_table(c) -> list:
    """Section 4's CUDA part: the eager loop vs CUDA-graph decoding at batch 1, 64, 512, against the targets."""
    if not c:
        return []
    if "skipped" in c:
        return [f"**4b. Generation on CUDA**: skipped ({c['skipped']}).", ""]
    lines = [f"**4b. Generation on CUDA** ({c['device']}; sc09 model, sampling at temperature 1; graphs: one CUDA "
             "graph per kind of step; first call = compile + warm-up + capture)", "",
             "| batch | eager loop | graphs, eager kernels | graphs, compiled stacks | graphs / loop | x real time | "
             "first call (s) | compile (s) | capture (s) | target | met |", "|---" * 11 + "|"]
    for r in c["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | error: {r['error']} |" + " |" * 9)
            continue
        lines.append(f"| {r['batch']} | {r['eager_loop']:.0f} | {r['graphs_eager_kernels']:.0f} | "
                     f"{r['graphs_compiled']:.0f} | {r['graphs_over_loop']:.1f}x | {r['x_realtime']:.2f} | "
                     f"{r['graphs_compiled_first_s']:.1f} | {r['graphs_compiled_compile_s']:.1f} | "
                     f"{r['graphs_compiled_capture_s']:.2f} | {r['target']:,} | "
                     f"{'yes' if r['met'] else 'no'} |")
    return lines + [""]


def bound_table(rows) -> list:
    """Section 1's table rows: each implementation's time and its multiple of the bound."""
    return ["| implementation | time (ms) | x bound |", "|---|---|---|"] + [
        f"| {r['implementation']} | {r['seconds'] * 1e3:.1f} | {r['over_bound']:.2f} |" for r in rows]


def fused_rglru_table(f):
    """Section 1's second table: the fused RG-LRU op against its kernels' least traffic, and the recurrence it
    replaces."""
    lines = [f"The fused RG-LRU of an sc09 layer, forward + backward (B={f['batch']}, T={f['length']}, W={f['width']}, "
             f"{f['dtype']} in and out; bound = the kernels' least traffic (x, the output and their gradients; the gate "
             f"pre-activations' gradients) at the copy "
             f"bandwidth {f['bandwidth_gb_s']:.0f} GB/s = {f['bound_s'] * 1e3:.1f} ms)", "", *bound_table(f["rows"])]
    return lines + ["", f"The layer's recurrence with its output projection: fused "
                    f"{f['recurrence_fused_s'] * 1e3:.1f} ms, composite of torch ops {f['recurrence_composite_s'] * 1e3:.1f} "
                    f"ms: **{f['composite_over_fused']:.2f}x**", ""]


def markdown(results):
    m = results["machine"]
    lines = [f"Machine: {m['device']}, {m['threads']} threads, torch {m['torch']}, {m['when']}.", ""]
    if "scan" in results:
        s = results["scan"]
        lines += [f"**1. RG-LRU scan, forward + backward** (B={s['batch']}, T={s['length']}, {s['units']} complex units, "
                  f"{s['array_mb']:.0f} MB per array; bound = memcpy of the 8 array passes = {s['bound_s'] * 1e3:.1f} ms)", "",
                  *bound_table(s["rows"]), ""]
        if "fused" in s:
            lines += fused_rglru_table(s["fused"])
    if "train" in results:
        t = results["train"]
        lines += [f"**2. Training throughput, pooling vs none** (B={t['batch']}, T={t['length']}, "
                  f"{'bf16 autocast' if m.get('gpu') else 'fp32'}; compiled: `torch.compile(model)`, first step "
                  "untimed)", "", "| model | torch.compile | params | tokens/s | step (s) | peak GPU memory (GB) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {'yes' if r.get('compiled') else 'no'} | {r['params']:,} | "
                  f"{r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {gb(r.get('peak_gb'))} |"
                  for r in t["rows"]]
        eager = t.get("speedup_vs_no_pooling", t["rows"][0].get("speedup_vs_no_pooling", float("nan")))
        lines += ["", f"Pooling speed-up: **{eager:.2f}x** eager, "
                  f"{t.get('speedup_vs_no_pooling_best', eager):.2f}x best of eager and compiled (thesis: 1.87x)", ""]
    if "peers" in results:
        p = results["peers"]
        lines += [f"**3. Training throughput vs peers** (B={p['batch']}, T={p['length']}, sizes matched within 10%)", "",
                  "| model | kernels | params | tokens/s | step (s) | peak GPU memory (GB) | Poolformer speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            if "error" in r:
                lines.append(f"| {r['model']} | - | - | {r['error']} | - | - | - |")
                continue
            speed = f"{r['poolformer_speedup']:.2f}x" if "poolformer_speedup" in r else "-"
            if "(no " in r.get("kernels", ""):  # a peer measured without the kernels it is built for: not a fair race
                speed += ", against a peer without its kernels"
            lines.append(f"| {r['model']} | {r.get('kernels', '-')} | {r['params']:,} | {r['tokens_per_s']:.0f} | "
                         f"{r['step_s']:.2f} | {gb(r.get('peak_gb'))} | {speed} |")
        lines.append("")
    if "generate" in results:
        g = results["generate"]
        lines += [f"**4. Generation samples/s** (sc09 model, {g['new_tokens']} new samples per row, sampling at "
                  f"temperature 1; real time = {g['realtime_rate']} samples/s; peers: 640 samples, same sampling)", "",
                  "| batch | threads | eager loop | generate, eager steps | generate, compiled step | compiled / loop | "
                  "x real time | first compiled call (s) | " + " | ".join(PEERS) + " |",
                  "|---" * (8 + len(PEERS)) + "|"]
        for r in g["rows"]:
            peers = " | ".join(f"{r[n]:.0f}" if n in r else "-" for n in PEERS)
            lines.append(f"| {r['batch']} | {r['threads']:.0f} | {r['eager_loop']:.0f} | {r['generate_eager']:.0f} | "
                         f"{r['generate_compiled']:.0f} | {r['compiled_over_loop']:.2f}x | "
                         f"{r['generate_compiled'] / g['realtime_rate']:.3f} | {r['compile_s']:.1f} | {peers} |")
        lines.append("")
        lines += cuda_generation_table(g.get("cuda"))
    if "length" in results:
        lines += [f"**5. One training step vs sequence length** (B=1, fresh process per point; Poolformer: per-block "
                  f"checkpointing up to T={CHUNK}, checkpointed time chunks of {CHUNK} beyond; GPT-2: per-layer "
                  "checkpointing; peak = the process's RSS on CPU, where glibc returns freed tensors >= 1 MB to the OS; "
                  "peak allocated memory on a GPU)",
                  "", "| T | Poolformer step (s) | Poolformer peak (GB) | GPT-2 step (s) | GPT-2 peak (GB) |",
                  "|---|---|---|---|---|"]
        for r in results["length"]["rows"]:
            def cell(x):
                if x is None:
                    return "-", "-"
                if x["status"] != "ok":
                    return x["status"], f"{x.get('peak_gb', float('nan')):.1f}"
                return f"{x['step_s']:.2f}", f"{x['peak_gb']:.1f}"
            p, q = cell(r["poolformer"]), cell(r.get("gpt2"))
            lines.append(f"| 2^{int(math.log2(r['length']))} | {p[0]} | {p[1]} | {q[0]} | {q[1]} |")
        lines.append("")
    if "data" in results:
        d = results["data"]
        lines += ["**6. Data at scale** (synthetic 1-s 16-bit clips; start-up = building the splits and the header "
                  "index in a fresh process; RSS growth = peak RSS over the process's RSS after its imports)", "",
                  "| source | run | start-up (s) | RSS growth (MB) | items |", "|---|---|---|---|---|"]
        lines += [f"| {r['source']} | {r['run']} | {r['seconds']:.2f} | {r['rss_growth_mb']:.0f} | {r['items']:,} |"
                  if "error" not in r else f"| {r['source']} | {r['run']} | {r['error']} | - | - |"
                  for r in d["startup"]]
        if d.get("train_memory"):
            lines += ["", "train.py on parquet folders of 1-s clips (4 files, 3 row groups each; tiny model, batch 1, "
                      "1 step), peak RssAnon / RssFile in MB sampled from /proc every 0.2 s: the training process "
                      "during start-up (load_dataset, splits, index, model) and while training (evaluation, step, "
                      "export), and the largest of its children (the cold start's conversion, index workers, DataLoader "
                      "workers; their RssAnon includes the pages shared with the process they were forked from)", "",
                      "| clips (parquet MB) | start | s | start-up: anon / file | training: anon / file | "
                      "child: anon / file (children) |", "|---|---|---|---|---|---|"]
            for r in d["train_memory"]:
                head = f"| {r['clips']:,} ({r['parquet_mb']:,.0f}) | {r['run']} |"
                if "error" in r:
                    lines.append(f"{head} {r['error']} | - | - | - |")
                    continue
                child = (f"{r['all_child_anon_mb']:,.0f} / {r['all_child_file_mb']:,.0f} ({r['children']})"
                         if "all_child_anon_mb" in r else "-")
                lines.append(f"{head} {r['seconds']:.0f} | {r['start_root_anon_mb']:,.0f} / "
                             f"{r['start_root_file_mb']:,.0f} | {r.get('training_root_anon_mb', 0):,.0f} / "
                             f"{r.get('training_root_file_mb', 0):,.0f} | {child} |")
        w = d["window"]
        lines += ["", f"1-s window of a 1-hour file: {w['window_of_hour_ms']:.2f} ms per item vs a 1-s file "
                  f"{w['one_s_file_ms']:.2f} ms (**{w['ratio']:.2f}x**)", "",
                  "| loader | workers | tokens/s | x training |", "|---|---|---|---|"]
        lines += [f"| {r['kind']} | {r['workers']} | {r['tokens_per_s']:,.0f} | "
                  f"{r['tokens_per_s'] / d['train_tokens_per_s']:.1f} |" for r in d["loader"]]
        lines += ["", f"SC09 model training: {d['train_tokens_per_s']:,.0f} tokens/s on the same machine.", "",
                  "| target | met |", "|---|---|"]
        lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in d["targets"].items()]
        lines.append("")
    if "pcm16" in results:
        c = results["pcm16"]
        f = c["flac"]
        lines += [f"**7. 16-bit speech, lossless** ({c['train_seconds_of_audio']:.0f} s of espeak-ng speech at 16 kHz "
                  f"for training, {c['test_clips']} held-out clips, {c['test_samples']:,} test samples in windows of "
                  f"{c['seq_len']}; {c['budget_s']:.0f} training seconds per model, batch {c['batch']}; bits per 16-bit "
                  f"sample, uniform = {c['uniform_bits']:.0f})", "",
                  "| coder | params | steps | bits/sample | own terms | vs FLAC |", "|---|---|---|---|---|---|",
                  f"| FLAC ({c['flac_level']}; same windows, header excluded) | - | - | "
                  f"{f['flac_bits_per_sample']:.3f} | - | 1.00 |"]
        lines += [f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['bits_per_sample']:.3f} | "
                  f"{r['own_bits_per_sample']:.3f} ({r['own_terms']}) | {r['vs_flac']:.3f} |" for r in c["rows"]]
        lines += ["", "Learning curves: `pcm16_curve.png` beside these results.", ""]
    if "traffic" in results:
        lines += traffic_markdown(results["traffic"])
    if "bytes" in results:
        from .bench_bytes import markdown as bytes_markdown

        lines += bytes_markdown(results["bytes"])
    return "\n".join(lines)


def traffic_markdown(t):
    lines = [f"**8. Memory traffic of a training step, fused RG-LRU vs the composite** (forward + backward, "
             f"{t['dtype']}, B={t['batch']}, T={t['length']}; saved = distinct storages autograd keeps for the backward, "
             "parameters excluded; written = output bytes of every aten op, views excluded, the ops inside the "
             "custom operators included; peak = the most the step's tensors held at once, and that per token times "
             "32 x 16,000 tokens, the thesis batch; tokens/s: fp32 training steps with AdamW on this machine)", "",
             "| model | RG-LRU | saved (KB/token) | saved tensors | written (KB/token) | ops | peak (KB/token) | "
             "peak at the thesis batch (GB) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['rglru']} | {r['saved_kb_per_token']:.1f} | {r['saved_tensors']:,} | "
              f"{r['written_kb_per_token']:.1f} | {r['ops']:,} | {r.get('peak_kb_per_token', float('nan')):.1f} | "
              f"{r.get('predicted_thesis_batch_gb', float('nan')):.1f} | {r.get('cpu_tokens_per_s', float('nan')):,.0f} |"
              for r in t["rows"]]
    for r in t["rows"]:
        if r["model"] == "sc09":
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["saved_by_op_kb"].items())[:6])
            lines += ["", f"sc09 {r['rglru']}, saved KB/token by the op before the save: {top}"]
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["written_by_op_kb"].items())[:8])
            lines += [f"sc09 {r['rglru']}, written KB/token by op: {top}"]
    lines.append("")
    if "gpu" in t:
        g = t["gpu"]
        lines += [f"GPU, batch {g['batch']}, T={g['length']}, bf16 autocast:", "",
                  "| model | RG-LRU | compiled | tokens/s | step (s) | peak GPU memory (GB) | SC09 epochs/h |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['rglru']} | {r.get('compile', 'eager')} | " +
                  (f"{r['error']} | - | - | - |" if "error" in r else
                  f"{r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {gb(r['peak_gb'])} | {r['epochs_per_h']:.1f} |")
                  for r in g["rows"]]
        lines += ["", "| T | batch | GPT-2 tokens/s | GPT-2 peak GB | Poolformer sc09 tokens/s | Poolformer peak GB |",
                  "|---|---|---|---|---|---|"]
        for r in g["gpt2"]:
            p = r["poolformer"]
            lines.append(f"| {r['length']} | {r['batch']} | {r.get('tokens_per_s', float('nan')):,.0f} "
                         f"| {gb(r.get('peak_gb'))} | {p.get('tokens_per_s', float('nan')):,.0f} | {gb(p.get('peak_gb'))} |")
        lines.append("")
    return lines
