"""Fidelity to the thesis author's JAX code: converted parameters reproduce the author's logits; the converter's
errors; the author's parameter counts and initialisation at SC09 size."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import ROOT
from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM
from modeling_poolformer.convert_flax_checkpoint import ConversionError, convert, main

AUTHOR = ROOT / "tests" / "data" / "author"
FIXTURES = sorted(p.name for p in AUTHOR.glob("*.npz"))


def _author_inputs(fixture):
    """The author's model sees [128, x_0, ..., x_{T-2}] and logits[:, t] predict x_t."""
    tokens = torch.from_numpy(fixture["tokens"])
    return torch.cat([torch.full_like(tokens[:, :1], 128), tokens[:, :-1]], dim=1)


def test_fixtures_are_present():
    assert {"author_small.npz", "author_sc09_pyramid.npz", "author_rms_ungated_real_linearpool.npz",
            "author_nonorm_embed_tcnn.npz", "author_mlp_nopool.npz"} <= set(FIXTURES)


@pytest.mark.compat
@pytest.mark.parametrize("name", FIXTURES)
def test_converted_model_reproduces_the_authors_logits(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    out = tmp_path / "hub"
    assert main(["--checkpoint", str(AUTHOR / name), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_poolformer.py",
            "configuration_poolformer.py"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    fixture = np.load(AUTHOR / name)
    ids = _author_inputs(fixture)
    want = torch.from_numpy(fixture["logits"])
    with torch.no_grad():
        got = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-4
    # the streaming path (prefill, then one sample at a time) is the same function
    with torch.no_grad():
        prefix = 37
        first = model(ids[:, :prefix], use_cache=True)
        steps = [first.logits]
        for t in range(prefix, prefix + 24):
            steps.append(model(ids[:, t : t + 1], cache=first.cache).logits)
    assert (torch.cat(steps, dim=1) - want[:, : prefix + 24]).abs().max().item() <= 1e-4


@pytest.mark.integration
def test_cli_output_loads_in_a_fresh_process_with_remote_code(tmp_path):
    # the command as a user runs it, then a process that cannot import this repo: the code comes from the folder
    run = subprocess.run([sys.executable, "-m", "modeling_poolformer.convert_flax_checkpoint", "--checkpoint",
                          str(AUTHOR / "author_small.npz"), "--out", str(tmp_path / "hub")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "75,904 parameters" in run.stdout
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hub")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        fixture = np.load({str(AUTHOR / "author_small.npz")!r})
        tokens = torch.from_numpy(fixture["tokens"])
        ids = torch.cat([torch.full_like(tokens[:, :1], 128), tokens[:, :-1]], dim=1)
        with torch.no_grad():
            error = (model(ids).logits - torch.from_numpy(fixture["logits"])).abs().max().item()
        print("max error", error)
        assert error <= 1e-4
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


def test_hparams_of_the_file_set_what_shapes_cannot():
    model = convert(AUTHOR / "author_small.npz")
    hparams = json.loads(str(np.load(AUTHOR / "author_small.npz")["hparams_json"]))
    assert model.config.dropout == hparams["dropout_rate"] == 0.0
    assert model.config.layers_per_level == [1, 1, 1] and model.config.pooling_factors == [2, 4]
    assert (model.config.hidden_size, model.config.lru_width, model.config.num_gate_blocks) == (32, 64, 8)


def _write_train_state_checkpoint(folder, fixture_path):
    """Two checkpoints as the author's train.py writes them (flax `save_checkpoint` of a TrainState), made with
    flax itself in a subprocess: `weights` are the fixture's parameters, `weights_ema` half of them."""
    script = textwrap.dedent(f"""
        import dataclasses, numpy as np, jax, jax.numpy as jnp, optax, flax
        from flax.training import checkpoints
        flax.config.update("flax_use_orbax_checkpointing", False)  # as the author's train.py
        from flax.traverse_util import unflatten_dict
        npz = np.load({str(fixture_path)!r})
        params = {{"params": unflatten_dict({{tuple(k.split("/")[1:]): jnp.asarray(npz[k]) for k in npz.files
                                            if k.startswith("params/")}})}}
        @dataclasses.dataclass(frozen=True)
        class TrainState:
            weights: object
            weights_ema: object
            optimizer_state: object
            step: object
            rng: object
        for step, ema_scale in ((10, 0.25), (20, 0.5)):
            state = TrainState(params, jax.tree.map(lambda w: w * ema_scale, params),
                               optax.adamw(2e-3, weight_decay=1e-4).init(params), np.array(step),
                               jax.random.PRNGKey(0))
            checkpoints.save_checkpoint({str(folder)!r}, dataclasses.asdict(state), step, "0a1b2c3d_", keep=2)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]


def test_flax_train_state_checkpoint_ema_and_raw_weights(tmp_path):
    pytest.importorskip("flax", reason="flax writes the reference checkpoint (installed by the test extra)")
    _write_train_state_checkpoint(tmp_path / "ckpt", AUTHOR / "author_small.npz")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["0a1b2c3d_10", "0a1b2c3d_20"]
    reference = convert(AUTHOR / "author_small.npz").state_dict()
    # what shapes cannot tell comes from --config: here the author's hyperparameters as JSON
    hparams = tmp_path / "hparams.json"
    hparams.write_text(str(np.load(AUTHOR / "author_small.npz")["hparams_json"]))
    raw = convert(tmp_path / "ckpt", ema=False)
    ema = convert(tmp_path / "ckpt", config=hparams)  # the newest step, EMA weights
    older = convert(tmp_path / "ckpt" / "0a1b2c3d_10", config=hparams)
    assert raw.config.dropout == 0.2 and ema.config.dropout == 0.0  # our default, the author's run
    for name, value in reference.items():
        torch.testing.assert_close(raw.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(ema.state_dict()[name], value * 0.5, rtol=0, atol=0)
        torch.testing.assert_close(older.state_dict()[name], value * 0.25, rtol=0, atol=0)
    fixture = np.load(AUTHOR / "author_small.npz")
    with torch.no_grad():
        got = raw(_author_inputs(fixture)).logits
    assert (got - torch.from_numpy(fixture["logits"])).abs().max().item() <= 1e-4


def _tree_npz(tmp_path, edit):
    """author_small.npz with `edit(arrays)` applied."""
    with np.load(AUTHOR / "author_small.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    edit(arrays)
    path = tmp_path / "edited.npz"
    np.savez(path, **arrays)
    return path


def _drop(prefix):
    def edit(arrays):
        for key in [k for k in arrays if k.startswith(prefix)]:
            del arrays[key]
    return edit


def _conv_block_instead_of_rglru(arrays):
    """The author's "conv" block type (a causal conv as the temporal layer), which the port does not have."""
    _drop("params/temporal_pyramid/down_blocks_0/layer/RGLRU_0")(arrays)
    arrays["params/temporal_pyramid/down_blocks_0/layer/Conv_0/kernel"] = np.zeros((3, 32, 32), np.float32)
    arrays["params/temporal_pyramid/down_blocks_0/layer/Conv_0/bias"] = np.zeros(32, np.float32)


@pytest.mark.parametrize(
    "edit,match",
    [
        (_drop("params/temporal_pyramid"), r"not a PatchARModel parameter tree: no \['temporal_pyramid'\]"),
        (_conv_block_instead_of_rglru, "a causal conv block where an RG-LRU block was expected"),
        (_drop("params/temporal_pyramid/inner_layer/inner_layer/blocks_1"), r"1 blocks; expected \(RG-LRU block, MLP"),
        (_drop("params/temporal_pyramid/up_blocks_1"), "2 down blocks but 1 up blocks"),
        (lambda a: a.update({"params/cls_head/Dense_0/kernel": np.zeros((32, 32), np.float32)}), "cls-head stack"),
        (lambda a: a.update({"hparams_json": np.array(json.dumps({"base_dim": 64}))}),
         "disagree with hparams_json: hidden_size: 64 in hparams_json, 32 in the checkpoint"),
        (lambda a: a.update({"hparams_json": np.array(json.dumps({"rnn": {"input_norm": False}}))}),
         "input_norm=False"),
        (lambda a: a.update({"params/temporal_pyramid/up_pool/Conv_0/kernel": np.zeros((2, 32, 32), np.float32)}),
         "depthwise"),
    ],
)
def test_trees_that_do_not_fit_fail_clearly(tmp_path, edit, match):
    with pytest.raises(ConversionError, match=match):
        convert(_tree_npz(tmp_path, edit))


def test_config_that_disagrees_with_the_shapes_fails_and_cli_exits_2(tmp_path, capsys):
    with pytest.raises(ConversionError, match=r"disagree with --config: .*hidden_size: 128 in --config, 32 in the"):
        convert(AUTHOR / "author_small.npz", config=ROOT / "hub_configs" / "sc09")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "missing.msgpack"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "garbage_5").write_bytes(b"\x93\x01")
    with pytest.raises(ConversionError, match="not a msgpack|does not hold a dict"):
        convert(tmp_path)


def test_cli_refuses_an_occupied_out_unless_overwrite(tmp_path, read_only_folder, capsys):
    out = tmp_path / "hub"
    assert main(["--checkpoint", str(AUTHOR / "author_small.npz"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    for target, match in [(out, f"--out {out} is not empty (it holds "), (read_only_folder / "hub", "cannot write into")]:
        with pytest.raises(SystemExit) as exit_info:  # checked before converting
            main(["--checkpoint", str(AUTHOR / "author_mlp_nopool.npz"), "--out", str(target)])
        assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    assert main(["--checkpoint", str(AUTHOR / "author_mlp_nopool.npz"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def _truncated(tmp_path):
    path = tmp_path / "truncated.npz"
    data = (AUTHOR / "author_small.npz").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_json(tmp_path):
    (tmp_path / "config.json").write_text("{'base_dim': 32,")
    return tmp_path / "config.json"


@pytest.mark.parametrize("make,config,match", [
    (_truncated, None, r"--checkpoint .*truncated.npz: not a readable .npz file \(BadZipFile"),
    (lambda t: _tree_npz(t, lambda a: a.update({"params/cls_head/final/kernel": np.zeros(256, np.float32)})), None,
     r"edited.npz: parameter params/cls_head/final/kernel has shape \(256,\), expected a 2-D array"),
    (lambda t: _tree_npz(t, lambda a: a.update({"params/norm/bias": np.array(["a"] * 32)})), None,
     r"edited.npz: parameter params/norm/bias is an array of dtype <U1, expected an array of numbers"),
    (lambda t: _tree_npz(t, lambda a: a.update({"hparams_json": np.array("{base_dim: 32")})), None,
     r"edited.npz: its hparams_json is not JSON"),
    (lambda t: _tree_npz(t, lambda a: a.update({"hparams_json": np.array(json.dumps({"input_transform": "fourier"}))})),
     None, r"edited.npz: its hparams_json: hyperparameter input_transform='fourier': expected one of"),
    (lambda t: AUTHOR / "author_small.npz", _not_json, r"--config .*config.json is not JSON"),
    (lambda t: AUTHOR / "author_small.npz", lambda t: (t / "h.json").write_text('{"input_transform": "fourier"}') and t / "h.json",
     r"--config .*h.json: hyperparameter input_transform='fourier'"),
])
def test_cli_names_the_file_and_the_parameter_of_bad_input(tmp_path, make, config, match, capsys):
    # each of these ended in a traceback (BadZipFile, not enough values to unpack, could not convert string to
    # float, JSONDecodeError, KeyError: 'fourier')
    argv = ["--checkpoint", str(make(tmp_path)), "--out", str(tmp_path / "out")]
    if config:
        argv += ["--config", str(config(tmp_path))]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_config_supplies_what_shapes_cannot(tmp_path):
    # a Beethoven-style config: the quantisation and the sample rate come from it, the sizes from the checkpoint
    config = PoolformerConfig(hidden_size=32, lru_width=64, num_gate_blocks=8, pooling_factors=[2, 4],
                              layers_per_level=1, pooling_groups=32, quantization="linear", dropout=0.1)
    config.save_pretrained(tmp_path)
    model = convert(AUTHOR / "author_small.npz", config=tmp_path)
    assert model.config.quantization == "linear" and model.config.hidden_size == 32
    assert model.config.dropout == 0.0  # hparams_json in the file wins over --config


# ---------------------------------------------------------------------------------------------------------------------
# SC09 size: the author's parameter counts and initialisation
# ---------------------------------------------------------------------------------------------------------------------


def _sc09(**overrides):
    return PoolformerForCausalLM(PoolformerConfig.from_pretrained(ROOT / "hub_configs" / "sc09", **overrides))


def test_parameter_counts_are_the_authors():
    # counted on the author's PatchARModel with the same hyperparameters
    counts = {"sc09": 7_272_704, "sc09-no-gating": 5_489_408, "sc09-real-rglru": 7_355_648,
              "sc09-rmsnorm": 7_263_488, "sc09-no-pooling": 7_267_840, "sc09-pool-2": 7_268_608,
              "sc09-pool-2-4": 7_269_888, "tiny": 63_904}
    for name, count in counts.items():
        model = PoolformerForCausalLM(PoolformerConfig.from_pretrained(ROOT / "hub_configs" / name))
        assert model.num_parameters() == count, name


def test_temporal_block_shapes():
    block = _sc09().model.body.down[0]
    shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
    assert shapes["layer.input_proj.weight"] == (256, 128)
    assert shapes["layer.input_gate.weight"] == (32, 8, 4)  # 256 -> 128: one input gate per complex unit
    assert shapes["layer.recurrence_gate.weight"] == (32, 8, 4)
    assert shapes["layer.out_proj.weight"] == (128, 256)  # the RG-LRU's own output projection
    assert shapes["gate_proj.weight"] == (128, 128) and shapes["out_proj.weight"] == (128, 128)


def _check_std(tensor, want, truncated):
    values = tensor.detach().flatten().double()
    assert abs(values.std().item() - want) < 0.06 * want, (values.std().item(), want)
    if truncated:  # at two standard deviations of the untruncated normal
        assert values.abs().max().item() <= 2 * want / 0.87962566103423978 + 1e-6
    else:
        assert values.abs().max().item() > 2.5 * want


def test_initialisation_statistics_are_the_authors():
    torch.manual_seed(0)
    body = _sc09().model.body
    # gates of all 72 RG-LRUs pooled, so the sample std is tight
    lrus = [m for m in body.modules() if type(m).__name__ == "PoolformerRGLRU"]
    gate_w = torch.cat([m.input_gate.weight.flatten() for m in lrus] + [m.recurrence_gate.weight.flatten() for m in lrus])
    gate_b = torch.cat([m.input_gate.bias for m in lrus] + [m.recurrence_gate.bias for m in lrus])
    _check_std(gate_w, 1 / math.sqrt(256), truncated=True)  # fan-in: the whole 256-wide input
    _check_std(gate_b, 1 / math.sqrt(32), truncated=True)  # fan-in: the number of blocks
    _check_std(torch.cat([m.input_proj.weight.flatten() for m in lrus]), 1 / math.sqrt(128), truncated=True)
    _check_std(torch.cat([m.out_proj.weight.flatten() for m in lrus]), 1 / math.sqrt(256), truncated=True)
    assert all(m.input_proj.bias.abs().max() == 0 for m in lrus)
    # UpPools: variance 1 / (17 p) (fan-in = the kernel width p); DownPools: truncated LeCun over p
    level, ups, downs = body, [], []
    while hasattr(level, "up_pool"):
        ups.append((level.up_pool.proj.weight, level.factor))
        downs.append((level.down_pool.proj.weight, level.factor))
        level = level.inner
    for weight, p in ups:
        _check_std(weight, math.sqrt(1 / (17 * p)), truncated=False)
    for weight, p in downs:
        assert abs(weight.std().item() - 1 / math.sqrt(p)) < 0.15 / math.sqrt(p)
        assert weight.abs().max().item() <= 2 / math.sqrt(p) / 0.87962566103423978 + 1e-6
    # residual output projections: normal, variance 1 / (17 fan_in) in a SkipBlock (RG-LRU blocks: fan-in 128)
    _check_std(torch.cat([b.out_proj.weight.flatten() for b in body.down[::2]]), math.sqrt(1 / (17 * 128)),
               truncated=False)
