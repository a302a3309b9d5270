"""Convert a checkpoint of the thesis author's JAX/Flax code (github.com/daniel-gallo/ssm, `PatchARModel`) into a
Hub folder that loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

    python -m modeling_poolformer.convert_flax_checkpoint --checkpoint PATH --out DIR [--config CONFIG] [--no_ema]

`DIR` must be new or empty; `--overwrite` writes over the model in a folder that holds one.

`PATH` is one of
- a checkpoint file written by the author's `train.py` (flax `checkpoints.save_checkpoint` of its `TrainState`:
  msgpack with `weights`, `weights_ema`, `optimizer_state`, `step`, `rng`), or the folder holding such files (the
  newest step is taken); the EMA weights are converted unless `--no_ema`;
- an `.npz` of flattened parameters, `params/<flax path>` -> array, optionally with `hparams_json`.

Every size is read off the parameter shapes: width, vocabulary, pooling factors and kind, blocks per level, RG-LRU
width, complex or real, gate blocks, MLP expansion, gating, norm kind, temporal conv, input embedding. What shapes
cannot tell (recurrence scale c, dropout, quantisation, start token, init ranges) comes from `hparams_json` when
the file has one, then `--config`: a PoolformerConfig (a `config.json` or a folder such as `hub_configs/sc09`) or
the author's hyperparameters as JSON (`base_dim`, `pool_temporal`, `rnn: {log_a_scale, ...}`, ...). A value given
there that disagrees with the shapes is an error, as is a tree that is not a `PatchARModel` or that uses a part
the port does not have (attention or conv blocks, a cls-head stack, pooled features, RG-LRU position embeddings).

Reading msgpack checkpoints needs the `msgpack` package (`pip install poolformer-hf[convert]`); flax itself is not
needed.
"""

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import PoolformerConfig, PoolformerForCausalLM, audio_generation_config

PathLike = Union[str, Path]


class ConversionError(ValueError):
    """The checkpoint cannot be converted: the message says which part and why."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading: msgpack TrainState files (flax's format, read without flax) and .npz files
# ---------------------------------------------------------------------------------------------------------------------


def _msgpack_restore(data: bytes):
    """flax.serialization.msgpack_restore without flax: arrays are msgpack extension 1 (shape, dtype name, bytes),
    numpy scalars extension 3, complex numbers extension 2; arrays over 1 GiB are split into chunk dicts."""
    try:
        import msgpack
    except ImportError:
        raise ImportError(
            "Reading a flax checkpoint needs the msgpack package: pip install msgpack (or poolformer-hf[convert])."
        ) from None

    def array(payload):
        shape, dtype, buffer = msgpack.unpackb(payload, raw=True)
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise ConversionError(f"the checkpoint holds an array of dtype {dtype!r}, which numpy cannot read") from None
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    def ext_hook(code, payload):
        if code == 1:
            return array(payload)
        if code == 2:
            real, imag = msgpack.unpackb(payload)
            return complex(real, imag)
        if code == 3:
            return array(payload)[()]
        return msgpack.ExtType(code, payload)

    def unchunk(tree):
        if isinstance(tree, dict):
            if "__msgpack_chunked_array__" in tree:
                shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
                chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
                return np.concatenate(chunks).reshape(shape)
            return {k: unchunk(v) for k, v in tree.items()}
        return tree

    try:
        return unchunk(msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False))
    except (ValueError, msgpack.exceptions.ExtraData) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"not a msgpack (flax) checkpoint: {e}") from None


def _latest_checkpoint(folder: Path) -> Path:
    """The newest `<prefix><step>` file of the one run in `folder`, as flax's `latest_checkpoint` picks it."""
    runs = {}
    for path in folder.iterdir():
        match = re.fullmatch(r"(.*?)(\d+)", path.name)
        if path.is_file() and match:
            runs.setdefault(match.group(1), []).append((int(match.group(2)), path))
    if not runs:
        raise ConversionError(f"{folder} holds no checkpoint file (named <prefix><step>, as flax writes them)")
    if len(runs) > 1:
        raise ConversionError(
            f"{folder} holds checkpoints of {len(runs)} runs (prefixes {sorted(runs)}): pass one file as --checkpoint"
        )
    return max(next(iter(runs.values())))[1]


def _json_object(text: str, what: str) -> dict:
    """A JSON object (the hyperparameters or a config), or a ConversionError naming `what`."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConversionError(f"{what} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what} is JSON but not an object of hyperparameters (got {type(data).__name__})")
    return data


def _unflatten(flat: dict) -> dict:
    tree = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def load_flax_params(path: PathLike, ema: bool = True) -> tuple:
    """(parameter tree as nested dicts of numpy arrays, the file's hyperparameters or None, a description)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    if path.suffix == ".npz":
        try:
            with np.load(path) as npz:
                params = {k[len("params/"):]: npz[k] for k in npz.files if k.startswith("params/")}
                hparams = str(npz["hparams_json"]) if "hparams_json" in npz.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated, not a zip, pickled objects
            raise ConversionError(f"--checkpoint {path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        if not params:
            raise ConversionError(f"{path} has no 'params/<flax path>' arrays (keys: {sorted(npz.files)[:8]})")
        if hparams is not None:
            hparams = _json_object(hparams, f"--checkpoint {path}: its hparams_json")
        return _unflatten(params), hparams, f"{path} (flattened parameters)"
    if path.is_dir():
        if (path / "_CHECKPOINT_METADATA").exists() or (path / "checkpoint").is_dir():
            raise ConversionError(
                f"{path} is an orbax checkpoint; the author's train.py writes msgpack files (flax_use_orbax_checkpointing "
                "is off there): pass such a file or its folder"
            )
        path = _latest_checkpoint(path)
    state = _msgpack_restore(path.read_bytes())
    if not isinstance(state, dict):
        raise ConversionError(f"{path} does not hold a dict of parameters (got {type(state).__name__})")
    which = "weights_ema" if ema else "weights"
    if "weights" in state or "weights_ema" in state:
        if which not in state:
            raise ConversionError(f"{path} has no '{which}' entry (keys: {sorted(state)})")
        tree, what = state[which], ("EMA weights" if ema else "weights") + f" at step {state.get('step', '?')}"
    else:  # a bare variables dict or parameter tree
        tree, what = state, "parameters"
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    return tree, None, f"{path} ({what})"


# ---------------------------------------------------------------------------------------------------------------------
# The author's hyperparameters -> PoolformerConfig fields that shapes cannot tell
# ---------------------------------------------------------------------------------------------------------------------


def _author_hparams_to_fields(hparams: dict) -> dict:
    """Our config fields from the author's hyperparameter names (nested `rnn` or flat). Parts the port does not
    have raise `ConversionError`."""
    flat = dict(hparams)
    flat.update(flat.pop("rnn", None) or {})
    unsupported = {
        "input_norm": (False, "an RG-LRU without the sqrt(1 - |a|^2) input normalisation"),
        "pos_embedding": (True, "RG-LRU position embeddings"),
        "adaptive_d": (True, "RG-LRU widths that grow with pooled features"),
        "unet": (False, "SkipBlocks without down blocks (unet=False)"),
    }
    for key, (bad, what) in unsupported.items():
        if flat.get(key) == bad:
            raise ConversionError(f"hyperparameter {key}={bad}: {what} is not part of this port")
    if flat.get("block_type", "rglru") != "rglru":
        raise ConversionError(f"hyperparameter block_type={flat['block_type']!r}: only the RG-LRU is ported")
    if any(f != 1 for f in flat.get("pool_features", ())):
        raise ConversionError(f"hyperparameter pool_features={flat['pool_features']}: pooled features are not ported")
    if flat.get("cls_head"):
        raise ConversionError(f"hyperparameter cls_head={flat['cls_head']}: a cls-head stack is not ported")

    fields = {}
    renames = {
        "base_dim": "hidden_size", "d_hidden": "lru_width", "n_diag_blocks": "num_gate_blocks",
        "pool_temporal": "pooling_factors", "use_gating": "gated", "norm": "norm", "ff_expand": "mlp_expansion",
        "dropout_rate": "dropout", "init_minval_real": "r_min", "init_maxval_real": "r_max",
        "init_maxval_imag": "max_phase", "layernorm_eps": "norm_eps", "num_cats": "vocab_size",
        "data_num_cats": "vocab_size", "baseline": "bos_token_id", "data_baseline": "bos_token_id",
    }
    for theirs, ours in renames.items():
        if flat.get(theirs) is not None:
            fields[ours] = list(flat[theirs]) if isinstance(flat[theirs], (list, tuple)) else flat[theirs]
    if "log_a_scale" in flat:
        fields["recurrence_scale"] = -float(flat["log_a_scale"])
    if "only_real" in flat:
        fields["complex_recurrence"] = not flat["only_real"]
    if "complex_rglru" in flat:
        fields["complex_recurrence"] = bool(flat["complex_rglru"])
    if "mu_law_encoding" in flat:
        fields["quantization"] = "mu-law" if flat["mu_law_encoding"] else "linear"
    if "input_transform" in flat:
        transforms = {"sine": "sinusoidal", "embed": "learned", "mlp": "mlp"}
        if flat["input_transform"] not in transforms:
            raise ConversionError(f"hyperparameter input_transform={flat['input_transform']!r}: expected one of "
                                  f"{sorted(transforms)}")
        fields["embedding"] = transforms[flat["input_transform"]]
    if "conv_pooling" in flat:
        fields["pooling"] = "conv" if flat["conv_pooling"] else "linear"
    if "use_temporal_cnn" in flat:
        fields["conv1d_width"] = int(flat.get("conv_kernel_size", 3)) if flat["use_temporal_cnn"] else 0
    if "model_structure" in flat:
        structure = [list(level) for level in flat["model_structure"]]
        for level in structure:
            if any(kind != "rglru" for kind in level):
                raise ConversionError(f"model_structure level {level}: only 'rglru' blocks are ported")
        fields["layers_per_level"] = [len(level) for level in structure]
    return fields


def _is_our_config(data: dict) -> bool:
    return data.get("model_type") == PoolformerConfig.model_type or "pooling_factors" in data or "hidden_size" in data


def read_config(path: Optional[PathLike]) -> tuple:
    """`--config` -> (fields from our config or None, fields from the author's hyperparameters or None)."""
    if path is None:
        return None, None
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"--config {path}: no such file (a config.json, a folder holding one, or a JSON file)")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"--config {file}: cannot be read ({e})") from None
    data = _json_object(text, f"--config {file}")
    try:
        if _is_our_config(data):
            return PoolformerConfig.from_pretrained(file).to_dict(), None
        return None, _author_hparams_to_fields(data)
    except (ValueError, TypeError) as e:  # the config's own checks, or a hyperparameter the port lacks
        raise ConversionError(f"--config {file}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# The parameter tree -> (inferred config fields, our state dict)
# ---------------------------------------------------------------------------------------------------------------------


_NDIM = {"bias": 1, "scale": 1, "a_real_param": 1, "a_imag_param": 1, "embedding": 2, "W": 3}


def _check_leaves(tree, source: str, where: str = "params"):
    """Every parameter is an array of numbers with the rank its name implies (a Dense kernel 2-D, a Conv kernel
    3-D, ...): a ConversionError naming the file and the parameter otherwise, before any of them is used."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            _check_leaves(value, source, f"{where}/{key}")
        return
    numeric = isinstance(tree, (np.ndarray, np.generic)) and (tree.dtype.kind in "fiu" or "float" in tree.dtype.name)
    if not numeric:  # (bfloat16 and the like are numpy "void" kinds)
        what = f"an array of dtype {tree.dtype}" if isinstance(tree, (np.ndarray, np.generic)) else type(tree).__name__
        raise ConversionError(f"--checkpoint {source}: parameter {where} is {what}, expected an array of numbers")
    parent, name = where.split("/")[-2:] if "/" in where else ("", where)
    ndim = (3 if parent.startswith("Conv") else 2) if name == "kernel" else _NDIM.get(name)
    if ndim is not None and tree.ndim != ndim:
        raise ConversionError(f"--checkpoint {source}: parameter {where} has shape {tuple(tree.shape)}, expected a "
                              f"{ndim}-D array")


def _numbered(node: dict, name: str) -> list:
    """node[name_0], node[name_1], ... as a list."""
    out = []
    while f"{name}_{len(out)}" in node:
        out.append(node[f"{name}_{len(out)}"])
    return out


def _tensor(array) -> torch.Tensor:
    """A float32 copy (arrays read from msgpack are read-only views of the file's bytes)."""
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _dense(node: dict, where: str) -> tuple:
    """flax Dense (kernel (in, out), bias) -> torch Linear (weight (out, in), bias)."""
    if not isinstance(node, dict) or set(node) != {"kernel", "bias"}:
        raise ConversionError(f"{where}: expected a Dense layer (kernel, bias), found {sorted(node)}")
    return _tensor(node["kernel"].T), _tensor(node["bias"])


class _Converter:
    """Walks the author's tree once, recording our state dict and every size it implies (checked for agreement)."""

    def __init__(self):
        self.state = {}
        self.fields = {}

    def agree(self, field, value, where):
        if field in self.fields and self.fields[field] != value:
            raise ConversionError(f"{where} implies {field}={value!r}, other parts {self.fields[field]!r}")
        self.fields[field] = value

    def linear(self, node, ours, where):
        weight, bias = _dense(node, where)
        self.state[f"{ours}.weight"], self.state[f"{ours}.bias"] = weight, bias
        return weight.shape  # (out, in)

    def norm(self, block, ours, where):
        if "LayerNorm_0" in block:
            self.agree("norm", "layer", where)
            node = block["LayerNorm_0"]
            self.state[f"{ours}.weight"], self.state[f"{ours}.bias"] = (_tensor(node["scale"]),
                                                                        _tensor(node["bias"]))
        elif "RMSNorm_0" in block:
            self.agree("norm", "rms", where)
            self.state[f"{ours}.weight"] = _tensor(block["RMSNorm_0"]["scale"])
        else:
            self.agree("norm", "none", where)

    def res_block(self, block, ours, temporal, where):
        if "layer" not in block:
            raise ConversionError(f"{where}: not a ResBlock (no 'layer'; found {sorted(block)})")
        self.norm(block, f"{ours}.norm", where)
        gated = "Dense_1" in block
        self.agree("gated", gated, where)
        if gated:
            self.linear(block["Dense_0"], f"{ours}.gate_proj", f"{where}/Dense_0")
        self.linear(block["Dense_1" if gated else "Dense_0"], f"{ours}.out_proj", where)
        layer = block["layer"]
        if temporal:
            self.temporal_layer(layer, f"{ours}.layer", f"{where}/layer")
        else:
            if set(layer) != {"Dense_0"}:
                raise ConversionError(
                    f"{where}/layer: expected the MLP block that follows every RG-LRU block (one Dense), found "
                    f"{sorted(layer)}"
                )
            out, d = self.linear(layer["Dense_0"], f"{ours}.layer", f"{where}/layer/Dense_0")
            self.agree("mlp_expansion", out // d, where)

    def temporal_layer(self, layer, ours, where):
        if "RGLRU_0" not in layer:
            kind = "a causal conv block" if "Conv_0" in layer else "an attention block" if layer else "an empty block"
            raise ConversionError(f"{where}: {kind} where an RG-LRU block was expected; only RG-LRU blocks are ported")
        if "Conv_0" in layer:  # the temporal CNN in front of the RG-LRU, with its LayerNorm
            kernel = layer["Conv_0"]["kernel"]  # (width, in / groups, out)
            self.agree("conv1d_width", kernel.shape[0], where)
            self.agree("conv1d_groups", kernel.shape[2] // kernel.shape[1], where)
            self.state[f"{ours}.conv1d.weight"] = _tensor(kernel.transpose(2, 1, 0))
            self.state[f"{ours}.conv1d.bias"] = _tensor(layer["Conv_0"]["bias"])
            norm = layer["LayerNorm_0"]
            self.state[f"{ours}.conv_norm.weight"] = _tensor(norm["scale"])
            self.state[f"{ours}.conv_norm.bias"] = _tensor(norm["bias"])
        else:
            self.agree("conv1d_width", 0, where)
        rglru, where = layer["RGLRU_0"], f"{where}/RGLRU_0"
        width, d_in = self.linear(rglru["Dense_0"], f"{ours}.input_proj", f"{where}/Dense_0")
        if d_in != self.fields["hidden_size"]:
            raise ConversionError(
                f"{where}/Dense_0 takes {d_in} features, the model width is {self.fields['hidden_size']}: RG-LRU "
                "position embeddings are not ported"
            )
        self.agree("lru_width", width, where)
        self.linear(rglru["Dense_1"], f"{ours}.out_proj", f"{where}/Dense_1")
        units = rglru["a_real_param"].shape[0]
        is_complex = "a_imag_param" in rglru
        self.agree("complex_recurrence", is_complex, where)
        if units != (width // 2 if is_complex else width):
            raise ConversionError(f"{where}: {units} recurrent units for width {width} ({'complex' if is_complex else 'real'})")
        self.state[f"{ours}.recurrence_param"] = _tensor(rglru["a_real_param"])
        if is_complex:
            self.state[f"{ours}.phase_param"] = _tensor(rglru["a_imag_param"])
        for index, gate in enumerate(("input_gate", "recurrence_gate")):
            node = rglru[f"BlockDiagonalLinear_{index}"]
            self.agree("num_gate_blocks", node["W"].shape[0], where)
            self.state[f"{ours}.{gate}.weight"] = _tensor(node["W"])
            self.state[f"{ours}.{gate}.bias"] = _tensor(node["b"].reshape(-1))

    def pairs(self, blocks, ours, where):
        """Alternating (RG-LRU, MLP) ResBlocks -> number of pairs."""
        if not blocks or len(blocks) % 2:
            raise ConversionError(f"{where}: {len(blocks)} blocks; expected (RG-LRU block, MLP block) pairs")
        for i, block in enumerate(blocks):
            self.res_block(block, f"{ours}.{i}", temporal=i % 2 == 0, where=f"{where}_{i}")
        return len(blocks) // 2

    def pool(self, node, ours, where, up):
        d = self.fields["hidden_size"]
        if "Conv_0" in node:
            self.agree("pooling", "conv", where)
            kernel = node["Conv_0"]["kernel"]  # (p, in / groups, out)
            if kernel.shape[1:] != (1, d):
                raise ConversionError(f"{where}: kernel {kernel.shape}; the author's pooling is depthwise, (p, 1, {d})")
            # the UpPool is a conv with input dilation p: a transposed conv with the kernel flipped in time
            kernel = kernel[::-1] if up else kernel
            self.state[f"{ours}.weight"] = _tensor(kernel.transpose(2, 1, 0))
            self.state[f"{ours}.bias"] = _tensor(node["Conv_0"]["bias"])
            return kernel.shape[0]
        if "Dense_0" in node:
            self.agree("pooling", "linear", where)
            out, d_in = self.linear(node["Dense_0"], ours, where)
            if (out if up else d_in) % d or (d_in if up else out) != d:
                raise ConversionError(f"{where}: a Dense of {d_in} -> {out} features cannot pool width {d}")
            return (out if up else d_in) // d
        raise ConversionError(f"{where}: expected Conv_0 or Dense_0, found {sorted(node)}")

    def model(self, tree):
        missing = {"temporal_pyramid", "cls_head", "norm"} - set(tree)
        if missing:
            raise ConversionError(
                f"not a PatchARModel parameter tree: no {sorted(missing)} at the top (found {sorted(tree)[:10]})"
            )
        head = tree["cls_head"]
        if set(head) != {"final"}:
            raise ConversionError(f"cls_head holds {sorted(head)}: a cls-head stack is not ported (only 'final')")
        out, d = self.linear(head["final"], "lm_head", "cls_head/final")
        self.fields.update(hidden_size=d, vocab_size=out)
        norm = tree["norm"]
        self.state["model.norm_f.weight"] = _tensor(norm["scale"])
        self.state["model.norm_f.bias"] = _tensor(norm["bias"])
        if "input_embed" in tree:
            self.fields["embedding"] = "learned"
            self.state["model.embed_tokens.embed.weight"] = _tensor(tree["input_embed"]["embedding"])
        elif "input_mlp" in tree:
            self.fields["embedding"] = "mlp"
            self.linear(tree["input_mlp"], "model.embed_tokens.value_proj", "input_mlp")
        else:
            self.fields["embedding"] = "sinusoidal"

        node, ours, factors, layers = tree["temporal_pyramid"], "model.body", [], []
        while "inner_layer" in node:  # one SkipBlock per pooling level
            where = "temporal_pyramid" + "/inner_layer" * len(factors)
            down, up = _numbered(node, "down_blocks"), _numbered(node, "up_blocks")
            if not down:
                raise ConversionError(f"{where}: a SkipBlock without down blocks (unet=False) is not ported")
            if len(down) != len(up):
                raise ConversionError(f"{where}: {len(down)} down blocks but {len(up)} up blocks")
            layers.append(self.pairs(down, f"{ours}.down", f"{where}/down_blocks"))
            self.pairs(up, f"{ours}.up", f"{where}/up_blocks")
            factor = self.pool(node["down_pool"], f"{ours}.down_pool.proj", f"{where}/down_pool", up=False)
            if self.pool(node["up_pool"], f"{ours}.up_pool.proj", f"{where}/up_pool", up=True) != factor:
                raise ConversionError(f"{where}: DownPool and UpPool factors differ")
            factors.append(factor)
            node, ours = node["inner_layer"], f"{ours}.inner"
        where = "temporal_pyramid" + "/inner_layer" * len(factors)
        blocks = _numbered(node, "blocks")
        if not blocks:
            raise ConversionError(f"{where}: expected the innermost stack (blocks_0, ...), found {sorted(node)[:10]}")
        layers.append(self.pairs(blocks, f"{ours}.blocks", f"{where}/blocks"))
        self.fields.update(pooling_factors=factors, layers_per_level=layers)
        self.fields.setdefault("pooling", "conv")
        self.fields["pooling_groups"] = d  # the author's pooling convs are depthwise
        return self.fields, self.state


def _merge(inferred: dict, sources: list) -> dict:
    """Inferred fields over the defaults; each (name, fields) source may add fields, but must agree on shapes."""
    fields = {}
    for name, source in reversed(sources):  # earlier sources win over later ones
        if source:
            fields.update(source)
    for name, source in sources:
        if not source:
            continue
        clashes = {
            k: (source[k], v) for k, v in inferred.items()
            if k in source and _normal(source[k]) != _normal(v)
        }
        if clashes:
            lines = "; ".join(f"{k}: {theirs!r} in {name}, {ours!r} in the checkpoint" for k, (theirs, ours) in clashes.items())
            raise ConversionError(f"the checkpoint's shapes disagree with {name}: {lines}")
    fields.update(inferred)
    return fields


def _normal(value):
    """Compare layers_per_level as a list (an int means the same count everywhere)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def convert(checkpoint: PathLike, config: Optional[PathLike] = None, ema: bool = True) -> PoolformerForCausalLM:
    """The author's checkpoint as a `PoolformerForCausalLM` (eval mode)."""
    tree, file_hparams, _ = load_flax_params(checkpoint, ema=ema)
    _check_leaves(tree, str(checkpoint))
    ours, theirs = read_config(config)
    if file_hparams:
        try:
            file_hparams = _author_hparams_to_fields(file_hparams)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"--checkpoint {checkpoint}: its hparams_json: {e}") from None
    inferred, state = _Converter().model(tree)
    if isinstance(ours, dict) and isinstance(ours.get("layers_per_level"), int):
        ours["layers_per_level"] = [ours["layers_per_level"]] * (len(ours.get("pooling_factors", [])) + 1)
    sources = [("hparams_json", file_hparams or None),
               ("--config", theirs), ("--config", ours)]
    fields = _merge(inferred, sources)
    for key in ("auto_map", "transformers_version", "model_type", "architectures", "_name_or_path"):
        fields.pop(key, None)
    try:
        model = PoolformerForCausalLM(PoolformerConfig(architectures=["PoolformerForCausalLM"], **fields))
    except (ValueError, TypeError) as e:  # a value from hparams_json or --config that the config refuses
        raise ConversionError(f"the converted config is not valid: {e}") from None
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ConversionError(f"converted names do not fit the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise ConversionError(f"{name}: shape {tuple(value.shape)} in the checkpoint, {tuple(expected[name].shape)} "
                                  "in the model")
    model.load_state_dict(state, strict=True)
    model.generation_config = audio_generation_config(model.config)
    return model.eval()


def _check_out(out: Path, overwrite: bool):
    """--out is a folder this process can write, and holds no files unless --overwrite (as train.py refuses a folder
    that holds another run)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out}: a file is in the way (expected a folder)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ConversionError(f"--out {out} is not empty (it holds {shown}): pick another --out, or pass --overwrite to "
                              "write the converted model over it")
    existing = out
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConversionError(f"--out {out}: cannot write into {existing} ({e.strerror or e})") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file or folder of the author's train.py, or an .npz")
    parser.add_argument("--out", required=True, help="folder to write the Hub model into")
    parser.add_argument("--config", help="a PoolformerConfig (config.json or its folder) or the author's hparams JSON, "
                                         "for what shapes cannot tell")
    parser.add_argument("--no_ema", action="store_true", help="convert the raw weights, not the EMA weights")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a model already in --out")
    args = parser.parse_args(argv)
    try:
        _check_out(Path(args.out), args.overwrite)  # before the conversion
        model = convert(args.checkpoint, args.config, ema=not args.no_ema)
    except (ConversionError, FileNotFoundError, ImportError) as e:
        parser.exit(2, f"convert_flax_checkpoint: error: {e}\n")
    model.save_pretrained(args.out)  # safetensors, config, generation config and the modeling code
    c = model.config
    print(f"converted {args.checkpoint} ({'raw' if args.no_ema else 'EMA'} weights): {model.num_parameters():,} "
          f"parameters, width {c.hidden_size}, pooling {c.pooling_factors}, pairs per level {c.layers_per_level}, "
          f"RG-LRU width {c.lru_width} ({'complex' if c.complex_recurrence else 'real'}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
