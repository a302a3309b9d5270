"""The model: remote-code loading, causality, odd lengths, loss conventions, input errors."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import MODEL_CONFIG_NAMES, ROOT, hub_config, hub_model
from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM

POOLED = [n for n in MODEL_CONFIG_NAMES if PoolformerConfig.from_pretrained(ROOT / "hub_configs" / n).pooling_factors]


def _fresh_env(tmp_path):
    """A subprocess that cannot import the repo's package: the model class must come from the saved folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    return env


@pytest.mark.integration
def test_saved_folder_is_a_complete_repo_and_loads_with_remote_code(tmp_path):
    model = PoolformerForCausalLM(hub_config("sc09", layers_per_level=2)).eval()
    model.save_pretrained(tmp_path / "saved")
    files = sorted(os.listdir(tmp_path / "saved"))
    # the cache, the scans, the fused RG-LRU and the codec travel with it
    assert {"config.json", "model.safetensors", "modeling_poolformer.py", "configuration_poolformer.py",
            "cache_poolformer.py", "scan.py", "rglru.py", "audio.py"} <= set(files)
    auto_map = json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}

    copy = tmp_path / "elsewhere" / "repo"
    shutil.copytree(tmp_path / "saved", copy)
    ids = torch.randint(0, 256, (2, 123))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(copy)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "PoolformerForCausalLM", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            got = model(ids).logits
        want = torch.load({str(tmp_path / 'want.pt')!r})
        assert torch.equal(got, want), (got - want).abs().max()
        print("bit-identical")
        if {importlib.util.find_spec("triton") is not None!r}:  # the shipped Triton scan (interpreted without a GPU)
            model = AutoModelForCausalLM.from_pretrained({str(copy)!r}, trust_remote_code=True,
                                                         scan_implementation="triton").eval()
            with torch.no_grad():
                # a short prefix: the interpreter runs each Triton program in numpy
                torch.testing.assert_close(model(ids[:1, :20]).logits, want[:1, :20], rtol=1e-5, atol=1e-5)
            print("triton scan from the saved folder")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_fresh_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bit-identical" in run.stdout
    assert ("triton scan from the saved folder" in run.stdout) == (importlib.util.find_spec("triton") is not None)


@pytest.mark.integration
def test_loading_without_trust_remote_code_fails_clearly(tmp_path):
    PoolformerForCausalLM(hub_config("tiny")).save_pretrained(tmp_path / "saved")
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / 'saved')!r})
        except ValueError as e:
            print("ERROR:", e)
        else:
            raise SystemExit("loaded some other model instead of failing")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_fresh_env(tmp_path),
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "trust_remote_code" in run.stdout


@pytest.mark.compat
def test_in_process_auto_classes_after_import(tmp_path):
    model = PoolformerForCausalLM(hub_config("tiny")).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _probe_positions(config):
    period = math.prod(config.pooling_factors) if config.pooling_factors else 1
    firsts = [math.prod(config.pooling_factors[: i + 1]) for i in range(len(config.pooling_factors))]
    picks = {0, 1, period - 1, period, period + 1, 2 * period - 2}
    picks |= {f - 1 for f in firsts} | {f - 2 for f in firsts if f >= 2} | set(firsts)
    return sorted(p for p in picks if p >= 0)


@pytest.mark.compat
@pytest.mark.parametrize("shift", ["fine", "coarse"])
@pytest.mark.parametrize("name", POOLED + ["sc09-no-pooling"])
def test_causality(name, shift):
    config = hub_config(name, causal_shift=shift)
    model = PoolformerForCausalLM(config).eval()
    period = math.prod(config.pooling_factors) if config.pooling_factors else 1
    length = 2 * period + 3
    ids = torch.randint(0, 256, (2, length))
    with torch.no_grad():
        base = model(ids).logits
        for t in _probe_positions(config):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 101) % 256
            diff = (model(changed).logits - base).abs().amax(dim=(0, 2))
            if t:
                assert diff[:t].max().item() <= 1e-6, f"logits before {t} changed by {diff[:t].max().item()}"
            assert diff[t:].max().item() > 1e-4, f"changing input {t} changed no later logit"
            assert diff[t].item() > 1e-4, f"logit {t} does not see input {t}"


@pytest.mark.parametrize("name", ["sc09", "sc09-long-skips", "sc09-coarse-shift", "tiny"])
def test_odd_lengths_match_prefix_of_longer_run(name):
    config = hub_config(name, conv1d_width=3)
    model = PoolformerForCausalLM(config).eval()
    period = math.prod(config.pooling_factors)
    ids = torch.randint(0, 256, (2, 3 * period + 5))
    with torch.no_grad():
        full = model(ids).logits
        for length in (1, period - 1, period, period + 1, 2 * period + 3):
            torch.testing.assert_close(model(ids[:, :length]).logits, full[:, :length], rtol=1e-5, atol=1e-5)


def test_all_option_combinations_run_and_train():
    """Every ablation switch builds, runs forward and backward and produces finite gradients."""
    for overrides in [
        dict(embedding="learned"), dict(embedding="mlp"), dict(pooling="linear"), dict(norm="rms"),
        dict(norm="none"), dict(gated=False), dict(complex_recurrence=False), dict(conv1d_width=4),
        dict(skip="long"), dict(pooling_groups=1), dict(pooling_factors=[]),
    ]:
        model = PoolformerForCausalLM(hub_config("tiny", **overrides)).train()
        ids = torch.randint(0, 256, (2, 37))
        out = model(ids, labels=ids)
        out.loss.backward()
        assert torch.isfinite(out.loss), overrides
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), overrides


@pytest.mark.compat
def test_loss_is_masked_mean_nll_in_nats_and_bits():
    model = PoolformerForCausalLM(hub_config("tiny")).eval()
    ids = torch.randint(0, 256, (3, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 11:] = 0
    labels = ids.clone()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        logp = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        valid = mask[:, 1:].bool()
        want = -(logp[valid]).mean()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.bits_per_sample, out.loss / math.log(2))
    # -100 labels are ignored like in every transformers causal LM
    labels2 = labels.masked_fill(mask == 0, -100)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=labels2).loss, out.loss)
    # right padding does not change the valid positions' logits
    padded = ids.clone()
    padded[1, 20:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[1, :20], out.logits[1, :20])


def test_logits_to_keep():
    model = PoolformerForCausalLM(hub_config("tiny")).eval()
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 256)
    torch.testing.assert_close(last, full[:, -1:])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=torch.rand(2, 5)), "integer tensor"),
        (dict(input_ids=torch.tensor([[1, 256]])), r"\[0, 256\)"),
        (dict(input_ids=torch.tensor([[-1, 3]])), r"\[0, 256\)"),
        (dict(input_ids=torch.tensor([1, 2, 3])), r"shape \(batch >= 1, length >= 1\)"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), r"shape \(batch >= 1, length >= 1\)"),
        (dict(), "exactly one of input_ids"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])),
         "right-padded"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5)), "attention_mask must have shape"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.ones(2, 3, dtype=torch.long)), "labels must have"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), cache=object()), "PoolformerCache"),
        (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), r"batch >= 1"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.bool)), "integer tensor"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.full((2, 4), 256)), r"labels must lie in"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.full((2, 4), -3)), r"labels must lie in"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.ones(2, 4)), "labels must be an integer"),
    ],
)
@pytest.mark.compat
def test_bad_inputs_raise_clear_errors(kwargs, match):
    model = PoolformerForCausalLM(hub_config("tiny"))
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_uint8_samples_are_token_ids():
    model = hub_model()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(torch.uint8)).logits, model(ids).logits)
        torch.testing.assert_close(model(ids.int(), labels=ids.int()).loss, model(ids, labels=ids).loss)


def test_a_step_with_the_wrong_batch_for_the_cache_is_refused():
    from modeling_poolformer import PoolformerCache

    model = hub_model()
    cache = PoolformerCache(model.config)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 7)), cache=cache)
        with pytest.raises(ValueError, match="holds a batch of 2, the input has 1"):
            model(torch.randint(0, 256, (1, 1)), cache=cache)


def test_a_folder_missing_weights_is_refused_unless_asked(tmp_path):
    from safetensors.torch import load_file, save_file

    model = hub_model()
    model.save_pretrained(tmp_path / "full")
    _, info = PoolformerForCausalLM.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert not info["missing_keys"]
    weights = load_file(tmp_path / "full" / "model.safetensors")
    del weights["model.body.up_pool.proj.weight"], weights["model.body.up_pool.proj.bias"]
    save_file(weights, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    for load in (lambda: PoolformerForCausalLM.from_pretrained(tmp_path / "full"),
                 lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "full", trust_remote_code=True)):
        with pytest.raises(ValueError, match=r"lacks 2 weights.*up_pool.*allow_missing_weights"):
            load()
    loaded = PoolformerForCausalLM.from_pretrained(tmp_path / "full", allow_missing_weights=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_thesis_init():
    config = PoolformerConfig.from_pretrained(ROOT / "hub_configs" / "sc09")
    model = PoolformerForCausalLM(config)
    lru = model.model.body.down[0].layer
    magnitude = torch.exp(-config.recurrence_scale * torch.nn.functional.softplus(lru.recurrence_param))
    r0 = magnitude ** (1 / config.recurrence_scale)
    assert r0.min() >= 0.9 - 1e-4 and r0.max() <= 0.99 + 1e-4
    assert lru.phase_param.min() >= 0 and lru.phase_param.max() <= 0.1 * math.pi
    out = model.model.body.down[0].out_proj.weight  # variance 1 / (17 * fan_in) in a 4-pair SkipBlock
    assert abs(out.std().item() - math.sqrt(1 / (17 * out.shape[1]))) < 0.1 * math.sqrt(1 / (17 * out.shape[1]))
    inner = model.model.body.inner.inner.inner.inner.blocks[0].out_proj.weight  # innermost stack: 1 / 8
    assert abs(inner.std().item() - math.sqrt(1 / (8 * inner.shape[1]))) < 0.1 * math.sqrt(1 / (8 * inner.shape[1]))


@pytest.mark.compat
@pytest.mark.parametrize("use_api", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_api):
    config = hub_config("sc09", conv1d_width=3)
    plain = PoolformerForCausalLM(config).train()
    if use_api:
        ckpt = PoolformerForCausalLM(config).train()
        ckpt.activation_checkpointing_enable()
    else:
        ckpt = PoolformerForCausalLM(hub_config("sc09", conv1d_width=3, activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    assert all(b.gradient_checkpointing for b in ckpt.modules() if hasattr(b, "gradient_checkpointing"))
    ids = torch.randint(0, 256, (2, 333))
    for model in (plain, ckpt):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,chunk", [("sc09", 160), ("sc09", 37), ("sc09-coarse-shift", 100), ("sc09-no-pooling", 50)])
def test_checkpointing_in_time_gives_the_same_loss_and_gradients(name, chunk):
    # chunks that cut pooling groups (37), end mid-group, and a flat stack: all exact, gradients included
    plain = PoolformerForCausalLM(hub_config(name, conv1d_width=3)).train()
    chunked = PoolformerForCausalLM(hub_config(name, conv1d_width=3, checkpoint_chunk_size=chunk)).train()
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 256, (2, 3 * 160 + 7))
    mask = torch.ones_like(ids)
    mask[1, 400:] = 0
    outputs = [model(ids, attention_mask=mask, labels=ids) for model in (plain, chunked)]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-5, atol=1e-5)
    for model, out in zip((plain, chunked), outputs):
        out.loss.backward()
    for (name_, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name_)
    with torch.no_grad():  # without gradients there is nothing to save, so no chunking
        torch.testing.assert_close(chunked(ids).logits, outputs[0].logits, rtol=1e-5, atol=1e-5)


def test_checkpointing_in_time_keeps_only_a_few_values_per_step():
    # outside the chunks, the autograd graph holds O(T) memory only in the hidden states and logits: count the
    # distinct storages saved for backward, against the plain forward's (the full sc09 widths)
    def saved_bytes(model, ids):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
        return sum(storages.values())

    config = PoolformerConfig.from_pretrained(ROOT / "hub_configs" / "sc09", dropout=0.0)
    plain = PoolformerForCausalLM(config).train()
    chunked = PoolformerForCausalLM(PoolformerConfig(**{**config.to_dict(), "checkpoint_chunk_size": 320})).train()
    ids = torch.randint(0, 256, (1, 3200))
    plain_bytes, chunked_bytes = saved_bytes(plain, ids), saved_bytes(chunked, ids)
    per_step = chunked_bytes / ids.shape[1]
    assert per_step < 4 * (config.vocab_size + 4 * config.hidden_size), (per_step, plain_bytes / ids.shape[1])
    assert chunked_bytes < plain_bytes / 20


@pytest.mark.parametrize("groups", [16, 4, 1])
@pytest.mark.parametrize("factor", [2, 5])
def test_pooling_equals_torch_strided_convolutions(groups, factor):
    # DownPool / UpPool compute their kernel = stride convolutions as contractions: the same as torch's convs
    from modeling_poolformer.modeling_poolformer import PoolformerDownPool, PoolformerUpPool

    config = PoolformerConfig(hidden_size=16, pooling_groups=groups, lru_width=16, num_gate_blocks=2,
                              pooling_factors=[factor], layers_per_level=1)
    down, up = PoolformerDownPool(config, 0), PoolformerUpPool(config, 0)
    for module in (down, up):
        torch.nn.init.normal_(module.proj.weight)
        torch.nn.init.normal_(module.proj.bias)
    x = torch.randn(3, 4 * factor, 16, requires_grad=True)
    got, want = down(x), down.proj(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, down.proj.weight))
    want_grads = torch.autograd.grad(want.square().sum(), (x, down.proj.weight))
    torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=1e-4)
    y = torch.randn(3, 4, 16)
    torch.testing.assert_close(up(y), up.proj(y.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.15), (torch.float16, 0.03)])
def test_half_precision_models_run_and_agree_with_fp32(dtype, tolerance):
    # the recurrence stays fp32 inside; everything else runs in the model's dtype
    small = dict(hidden_size=32, lru_width=32, num_gate_blocks=4, pooling_groups=32)
    reference = hub_model("sc09", **small)
    model = hub_model("sc09", **small)
    model.load_state_dict(reference.state_dict())
    model = model.to(dtype)
    ids = torch.randint(0, 256, (2, 400))
    with torch.no_grad():
        want = torch.log_softmax(reference(ids).logits.double(), -1)
        logits = model(ids).logits
        assert logits.dtype == dtype
        assert (torch.log_softmax(logits.double(), -1) - want).abs().max().item() <= tolerance
        out = model.generate(ids[:, :37], max_new_tokens=20, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        stepped = torch.stack(out.logits, 1)
        assert (stepped - model(out.sequences).logits[:, 36:-1].float()).abs().max().item() <= tolerance
    assert all(t.dtype == torch.float32 for s in out.cache.stacks for t in s.recurrent_states)


def test_no_label_left_warns_that_the_loss_is_nan():
    model = hub_model()
    ids = torch.randint(0, 256, (2, 6))
    with pytest.warns(RuntimeWarning, match="no label left"):
        out = model(ids, labels=torch.full_like(ids, -100))
    assert torch.isnan(out.loss)
    with pytest.warns(RuntimeWarning, match="no label left"):
        model(ids, attention_mask=torch.zeros_like(ids), labels=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(model(ids, labels=ids).loss)


def _link_distributions(names, target):
    """Links the installed distributions `names` and everything they require (not their extras) into `target`: a
    site-packages folder holding just those packages."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    target.mkdir(exist_ok=True)
    todo, seen = list(names), set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if not (target / top).exists():
                (target / top).symlink_to(dist.locate_file(top))
    return seen


@pytest.mark.compat
@pytest.mark.integration
def test_loads_and_generates_with_only_torch_transformers_and_safetensors(tmp_path):
    # a virtual environment holding torch, transformers, safetensors and their own requirements, nothing else (the
    # installed distributions linked into its site-packages): the Hub folder still loads with remote code,
    # generates, streams and writes WAVs (with the standard library's `wave`)
    import venv

    model = hub_model()
    model.save_pretrained(tmp_path / "saved")
    venv.EnvBuilder(with_pip=False).create(tmp_path / "env")
    python = tmp_path / "env" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    present = _link_distributions(["torch", "transformers", "safetensors"], Path(site))
    assert not {"soundfile", "soxr", "numba", "accelerate", "datasets", "triton"} & present
    script = textwrap.dedent(f"""
        import importlib.util
        assert importlib.util.find_spec("modeling_poolformer") is None and importlib.util.find_spec("soundfile") is None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True)
        tokens = model.generate(max_new_tokens=200, streamer=model.audio_streamer({str(tmp_path / "live.wav")!r}))
        paths = model.save_wav(tokens, {str(tmp_path / "after.wav")!r})
        print("OK", tokens.shape, [p.stat().st_size for p in paths])
    """)
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HOME": str(tmp_path)}
    run = subprocess.run([str(python), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "OK torch.Size([1, 201]) [444]" in run.stdout  # a 44-byte header and 200 16-bit samples
    assert (tmp_path / "live.wav").read_bytes() == (tmp_path / "after.wav").read_bytes()
