"""Poolformer configuration (arXiv 2510.02206): a raw-audio language model built from RG-LRU recurrences
nested in pooling SkipBlocks."""

import difflib
import math
import warnings

import transformers
from packaging.version import Version

# the releases CI runs the test suite on: the oldest `pyproject.toml` admits and the newest pip resolved when this
# was written; outside [oldest, next major) nothing imports, past the newest it warns once
TESTED_TRANSFORMERS = ("5.0.0", "5.25.0")


def check_transformers_version(version: str = transformers.__version__):
    """One clear message for a transformers release outside the supported range, instead of a trace from inside it."""
    oldest, newest = map(Version, TESTED_TRANSFORMERS)
    found = Version(version)
    if found < oldest or found.major > oldest.major:
        raise ImportError(
            f"Poolformer needs transformers >= {oldest}, < {oldest.major + 1} (tested on {oldest} and {newest}); this "
            f"environment has transformers {version}. Install a supported release: "
            f"pip install 'transformers>={oldest},<{oldest.major + 1}'"
        )
    if found.release[:2] > newest.release[:2]:
        warnings.warn(f"Poolformer was tested on transformers {oldest} to {newest}; this environment has {version}. "
                      f"If something fails, pip install 'transformers=={newest}' and tell us.", stacklevel=2)


check_transformers_version()

from transformers import GenerationConfig, PretrainedConfig  # noqa: E402
from transformers.activations import ACT2CLS  # noqa: E402

_NORMS = ("layer", "rms", "none")
_POOLINGS = ("conv", "linear")
_SHIFTS = ("fine", "coarse")
_SKIPS = ("short", "long")
_EMBEDDINGS = ("sinusoidal", "learned", "mlp")
_QUANTIZATIONS = ("mu-law", "linear", "pcm", "bytes")
BYTES_START = 0  # the start symbol (and default document separator) of byte models: NUL, which UTF-8 text never holds
_OUTPUT_HEADS = ("softmax", "dual-softmax")
# the values of `scan_implementation`, which `scan.linear_scan` takes too
SCAN_IMPLEMENTATIONS = ("auto", "numba", "loop", "chunked", "triton")
_AUTO_MAP = {
    "AutoConfig": "configuration_poolformer.PoolformerConfig",
    "AutoModel": "modeling_poolformer.PoolformerModel",
    "AutoModelForCausalLM": "modeling_poolformer.PoolformerForCausalLM",
}


class PoolformerConfig(PretrainedConfig):
    r"""
    Configuration of a Poolformer model. The defaults build the thesis' SC09 model (7,272,704 parameters), the same
    function as the thesis author's JAX code (`PatchARModel`); `python -m modeling_poolformer.convert_flax_checkpoint`
    converts that code's checkpoints. Options marked *extension* are ours: the author's code has no equivalent.

    Args:
        vocab_size (`int`, defaults to 256):
            Number of quantisation levels of the audio; token ids are sample values in `[0, vocab_size)`. 65,536
            with `quantization="pcm"` is 16-bit linear PCM: token = sample + 32768 (`hub_configs/*-16bit`).
        hidden_size (`int`, defaults to 128):
            Width D of the residual stream. It stays D at every pooling level.
        pooling_factors (`list[int]`, defaults to `[2, 4, 4, 5]`):
            Pooling factor of each SkipBlock, outermost first. An empty list means no pooling (one flat stack).
        layers_per_level (`int` or `list[int]`, defaults to 4):
            Number of (RG-LRU block, MLP block) pairs per level. An int uses the same count everywhere; a list has
            `len(pooling_factors) + 1` entries, the last one for the innermost stack. A SkipBlock runs this many
            pairs before pooling and as many again after un-pooling.
        lru_width (`int`, defaults to 256):
            Width of the RG-LRU: it projects the block input `hidden_size -> lru_width`, runs the recurrence and
            projects back `lru_width -> hidden_size`. A complex RG-LRU has `lru_width // 2` complex units (first half
            of the features real parts, second half imaginary parts); a real one has `lru_width` units.
        complex_recurrence (`bool`, defaults to `True`):
            Complex-valued (rotating) decay, as in the thesis. `False` gives the real RG-LRU of Griffin (ablation).
        num_gate_blocks (`int`, defaults to 32):
            Number of diagonal blocks of the block-diagonal gate projections `lru_width -> units`: one input gate and
            one recurrence gate per recurrent unit (a complex unit's real and imaginary parts share them). Must
            divide `lru_width` and the number of recurrent units.
        recurrence_scale (`float`, defaults to 8.0):
            The constant c in `log|a_t| = -c * r_t * softplus(Lambda)`.
        r_min (`float`, defaults to 0.9), r_max (`float`, defaults to 0.99):
            Range of the initial decay root: `r0 ~ sqrt(U[r_min^2, r_max^2])` and `|a| = r0^c` at `r_t = 1`.
        max_phase (`float`, defaults to 0.1):
            Initial phases are drawn from `U[0, max_phase * pi]` ("small ring"; ignored by a real recurrence).
        conv1d_width (`int`, defaults to 0):
            Kernel size of an optional causal temporal convolution in front of every RG-LRU, followed by a LayerNorm
            (the author's `use_temporal_cnn`). 0 switches it off (the thesis' SC09 model).
        conv1d_groups (`int`, defaults to 1):
            Groups of that convolution (the author's `conv_feature_group_count`; `hidden_size` makes it depthwise).
            Must divide `hidden_size`.
        mlp_expansion (`int`, defaults to 2):
            Width of the MLP block's hidden layer, as a multiple of `hidden_size`.
        gated (`bool`, defaults to `True`):
            Multiply each block's output by `act(Linear(h))`, at the block's inner width (`hidden_size` for an RG-LRU
            block, `mlp_expansion * hidden_size` for an MLP block). Without gating the block applies a plain
            `act` (ablation: 5,489,408 parameters at SC09 size).
        hidden_act (`str`, defaults to `"gelu_pytorch_tanh"`):
            The activation of the gates, a name from transformers' `ACT2FN`. The default is the tanh approximation
            of GELU, which flax's `nn.gelu` (the author's code) computes; `"gelu"` is the exact erf form.
        norm (`str`, defaults to `"layer"`):
            Pre-norm of every residual block: `"layer"` (LayerNorm), `"rms"` (RMSNorm) or `"none"`. The final norm
            before the head is a LayerNorm whatever this says, as in the author's code.
        norm_eps (`float`, defaults to 1e-6):
            Epsilon of the norms (flax's default, which the author's code uses).
        pooling (`str`, defaults to `"conv"`):
            `"conv"`: DownPool is a strided Conv1d and UpPool a strided ConvTranspose1d, both with
            `pooling_groups` groups; `"linear"`: reshape `(L*p, D) -> (L, p*D)` followed by a Linear (and the
            mirror image for UpPool).
        pooling_groups (`int`, *optional*):
            Groups G of the pooling convolutions; by default `hidden_size` (depthwise, the author's code), which is
            stable. Other values are an *extension* (G = 1, a full convolution, is the thesis' unstable ablation).
            Must divide `hidden_size`.
        causal_shift (`str`, defaults to `"fine"`):
            How the up-pooled sequence is delayed to stay causal. `"fine"`: by `p - 1` fine steps, as in the
            author's code (coarse step j feeds fine outputs `j*p+p-1 .. j*p+2p-2`); `"coarse"` (*extension*): by one
            whole coarse step (`p` fine steps), as in SaShiMi.
        skip (`str`, defaults to `"short"`):
            `"short"`: one residual connection around the pooled sub-network of each SkipBlock. `"long"`
            (*extension*): in addition, U-Net style connections from the input of every down block to the output
            of its mirror up block.
        embedding (`str`, defaults to `"sinusoidal"`):
            Token embedding (the author's `input_transform`). `"sinusoidal"` (`"sine"`): fixed Fourier features of
            the sample value, `[cos(v * w_k), sin(v * w_k)]` with `w_k = 10000^(-k / (D/2))`, no learned weights;
            `"learned"` (`"embed"`): an `nn.Embedding` (the byte models', `hub_configs/enwik8`); `"mlp"`: a
            Linear(1 -> D) of the value scaled to `2 v / vocab_size - 1`.
        dropout (`float`, defaults to 0.2):
            Dropout on the output of every residual block.
        sqrt_max_gradient (`float`, defaults to 200.0):
            Bound on the gradient of `sqrt(1 - |a|^2)`, which is infinite at `|a| = 1`.
        scan_implementation (`str`, defaults to `"auto"`):
            How the recurrence runs over a sequence: `"numba"` (compiled CPU kernels, the fastest on CPU),
            `"loop"` (one fused torch op per step), `"chunked"` (a chunked parallel scan in torch ops), `"triton"`
            (GPU kernels) or `"auto"` (numba on CPU when it is installed, else the loop; Triton on CUDA when it is
            installed, else chunked). All give the same result.
        scan_chunk_size (`int`, defaults to 0):
            Chunk length of the chunked scan; 0 picks about `sqrt(T)` per call.
        fused_rglru (`bool`, *optional*):
            Run the RG-LRU (gates, decays, input scale, scan) as one fused operator with its own backward, which
            recomputes the elementwise chain instead of saving it (`rglru.py`): a fraction of the memory and traffic
            of a training step. It runs where the scan implementation has fused kernels ("numba" on CPU, "triton" on
            CUDA); the torch scans ("loop", "chunked") and `False` run the composite of torch ops. `None` (default)
            and `True`: fused wherever those kernels exist, on CPUs as on GPUs (on a CPU it is also the faster of
            the two). Both give the same result to float tolerance. When on and gradients are recorded, the residual
            blocks with a LayerNorm and a GELU gate also run their fused gated output (`fused_block.py`), which saves
            only b and h (not even h: it is recomputed from the block's input) and recomputes the gate in the
            backward pass.
        activation_checkpointing (`bool`, defaults to `False`):
            Recompute each residual block in the backward pass instead of storing its activations (only its input
            is kept), so training steps on very long sequences fit in memory; `model.activation_checkpointing_enable()`
            switches it on too.
        checkpoint_chunk_size (`int`, defaults to 0):
            Activation checkpointing in time, for sequences too long for the per-block kind: a training forward
            (gradients on, no cache) longer than this many steps runs in chunks of this length, carrying the
            recurrent and pooling state from chunk to chunk, and each chunk is recomputed in the backward pass from
            the state that entered it. Gradients are exact; activation memory is one chunk's plus a few values per
            step (hidden state, logits). A multiple of prod(pooling_factors) keeps every chunk's pooled levels full.
            0 = off. Inside a chunk, blocks are not checkpointed again.
        sample_rate (`int`, defaults to 16000):
            Audio sample rate in Hz; used when tokens are turned into waveforms and when data is resampled.
        quantization (`str`, defaults to `"mu-law"`):
            How waveforms map to tokens: `"mu-law"` (mu = vocab_size - 1) or `"linear"`, SaShiMi's codecs of a
            float waveform; `"pcm"`: the file's own linear PCM values, offset to be non-negative (token = sample +
            vocab_size / 2; at vocab_size 65,536 the 16-bit samples themselves, read from WAV/FLAC without a float
            round trip). `training/data.py` never min-max scales PCM. `"bytes"`: the tokens are not audio but raw
            bytes (UTF-8 text, or any file), vocab_size 256; `model.decode_text` turns them into text and
            `model.text_streamer()` prints them while `generate` samples (`text.py`). Byte models start every
            sequence with `bos_token_id` 0 (NUL, which text does not contain), the byte that also separates
            documents in the training data (`training/text_data.py`), and use the `"learned"` embedding: a value's
            Fourier features order bytes by their code, which says nothing about the characters they stand for.
            `sample_rate` is ignored.
        output_head (`str`, defaults to `"softmax"`):
            `"softmax"`: one Linear(D -> vocab_size) and a softmax. `"dual-softmax"` (*extension*, for 16-bit PCM;
            WaveRNN's dual softmax, arXiv 1802.08435): with n = sqrt(vocab_size), token v has a coarse part
            c = v // n (the high byte at 16 bits) and a fine part f = v % n, and
            `p(v) = softmax(W_c h)[c] * softmax(W_f act(W_h h + E[c]))[f]`: the fine part sees the coarse part of
            its own sample (E is a learned table) and nothing later. The likelihood is exact over all vocab_size
            values; the loss is `-log p(c) - log p(f | c)` per sample. vocab_size must be a square.
        bos_token_id (`int`, *optional*):
            The "zero" token that starts every sequence: by default the middle of the range, `vocab_size // 2`
            (128 at 8 bits, 32768, the sample 0, at 16 bits); 0 (NUL) for `quantization="bytes"`.
        eos_token_id (`int` or `list[int]`, *optional*):
            A value that ends generation when sampled. None (default): audio has no end token, generation runs for
            `max_new_tokens`.
        pad_token_id (`int`, *optional*):
            The value that pads generated sequences of different lengths (transformers' generation utilities read it);
            None (default) pads with `bos_token_id`, the zero sample.
        use_cache (`bool`, defaults to `True`):
            Whether a forward in eval mode returns its `PoolformerCache` (recurrent and pooling state) when the call
            does not say (`use_cache=None`), as in every transformers decoder; training forwards never build one.
            `generate` carries a cache unless `use_cache=False`.
        tie_word_embeddings (`bool`, defaults to `False`):
            Always `False`: the sinusoidal embedding has no weights to tie.

    `num_hidden_layers` (read-only, from `pooling_factors` and `layers_per_level`) is the number of layers whose hidden
    states the model returns with `output_hidden_states`: the residual blocks that run at full length (the outer
    level's down and up blocks, or every block without pooling). `hidden_states` holds the embeddings and these
    blocks' outputs, the last one after the final norm: `num_hidden_layers + 1` tensors of shape (B, T, D).
    """

    model_type = "poolformer_audio"

    def __init__(
        self,
        vocab_size=256,
        hidden_size=128,
        pooling_factors=(2, 4, 4, 5),
        layers_per_level=4,
        lru_width=256,
        complex_recurrence=True,
        num_gate_blocks=32,
        recurrence_scale=8.0,
        r_min=0.9,
        r_max=0.99,
        max_phase=0.1,
        conv1d_width=0,
        conv1d_groups=1,
        mlp_expansion=2,
        gated=True,
        hidden_act="gelu_pytorch_tanh",
        norm="layer",
        norm_eps=1e-6,
        pooling="conv",
        pooling_groups=None,
        causal_shift="fine",
        skip="short",
        embedding="sinusoidal",
        dropout=0.2,
        sqrt_max_gradient=200.0,
        scan_implementation="auto",
        scan_chunk_size=0,
        fused_rglru=None,
        activation_checkpointing=False,
        checkpoint_chunk_size=0,
        sample_rate=16000,
        quantization="mu-law",
        output_head="softmax",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        # lists (as JSON gives them back) of their own; anything else is left for the rules to name
        sequence = (list, tuple)
        self.pooling_factors = list(pooling_factors) if isinstance(pooling_factors, sequence) else pooling_factors
        self.layers_per_level = list(layers_per_level) if isinstance(layers_per_level, sequence) else layers_per_level
        self.lru_width = lru_width
        self.complex_recurrence = complex_recurrence
        self.num_gate_blocks = num_gate_blocks
        self.recurrence_scale = recurrence_scale
        self.r_min = r_min
        self.r_max = r_max
        self.max_phase = max_phase
        self.conv1d_width = conv1d_width
        self.conv1d_groups = conv1d_groups
        self.mlp_expansion = mlp_expansion
        self.gated = gated
        self.hidden_act = hidden_act
        self.norm = norm
        self.norm_eps = norm_eps
        self.pooling = pooling
        self.pooling_groups = hidden_size if pooling_groups is None else pooling_groups
        self.causal_shift = causal_shift
        self.skip = skip
        self.embedding = embedding
        self.dropout = dropout
        self.sqrt_max_gradient = sqrt_max_gradient
        self.scan_implementation = scan_implementation
        self.scan_chunk_size = scan_chunk_size
        self.fused_rglru = fused_rglru
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_chunk_size = checkpoint_chunk_size
        self.sample_rate = sample_rate
        self.quantization = quantization
        self.output_head = output_head
        if bos_token_id is None:
            bos_token_id = BYTES_START if quantization == "bytes" else vocab_size // 2 if _is_int(vocab_size) else 128
        # set here: transformers' config takes none of them (and drops `use_cache` from its kwargs)
        self.eos_token_id = list(eos_token_id) if isinstance(eos_token_id, tuple) else eos_token_id
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        if tie_word_embeddings:
            raise ValueError("tie_word_embeddings: Poolformer's output head is never tied to the embedding; use False.")
        _warn_near_misses(kwargs)
        # a saved folder maps every Auto class to the copied code, whichever class saved it
        kwargs.setdefault("auto_map", dict(_AUTO_MAP))
        super().__init__(bos_token_id=bos_token_id, tie_word_embeddings=False, **kwargs)
        self.validate_poolformer()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As transformers' (which applies `from_pretrained(..., field=value)` overrides after `__init__`), then the
        same validation as `__init__`: an override gets no pass."""
        out = super().from_dict(config_dict, **kwargs)
        (out[0] if isinstance(out, tuple) else out).validate_poolformer()
        return out

    @property
    def modality(self) -> str:
        """`"text"` for byte models (`quantization="bytes"`: raw bytes, decoded as UTF-8), else `"audio"`."""
        return "text" if self.quantization == "bytes" else "audio"

    @property
    def num_levels(self):
        """Number of pooling levels plus the innermost stack."""
        return len(self.pooling_factors) + 1

    @property
    def num_hidden_layers(self) -> int:
        """Number of layers whose hidden states the model returns: the residual blocks that run at full length."""
        pairs = self.level_layers[0]
        return 4 * pairs if self.pooling_factors else 2 * pairs

    @num_hidden_layers.setter
    def num_hidden_layers(self, value):
        if value != self.num_hidden_layers:
            raise ValueError(f"PoolformerConfig.num_hidden_layers={value!r} is invalid: it follows from pooling_factors "
                             f"and layers_per_level ({self.num_hidden_layers} here); change those instead.")

    @property
    def level_layers(self):
        """(RG-LRU, MLP) pairs per level, outermost first, as a list of `num_levels` ints."""
        if isinstance(self.layers_per_level, int):
            return [self.layers_per_level] * self.num_levels
        return list(self.layers_per_level)

    @property
    def coarse_size(self) -> int:
        """Values of the coarse (and of the fine) part of a token under the dual-softmax head: sqrt(vocab_size)."""
        return math.isqrt(self.vocab_size)

    @property
    def num_recurrent_units(self):
        return self.lru_width // 2 if self.complex_recurrence else self.lru_width

    @property
    def block_stacks(self) -> list:
        """The model's stacks of residual blocks as `(role, level, pairs)` rows, in cache order: the "down" stack of
        each pooling level outermost first, the "inner" stack, then the "up" stacks innermost first. Each stack's
        module takes its index here (`block_stack_index`) and the cache lays out its states from this table, so the
        two cannot disagree."""
        levels, layers = len(self.pooling_factors), self.level_layers
        down = [("down", level, layers[level]) for level in range(levels)]
        up = [("up", level, layers[level]) for level in reversed(range(levels))]
        return down + [("inner", levels, layers[-1])] + up

    def block_stack_index(self, role: str, level: int) -> int:
        """Where the stack `role` ("down", "inner", "up") of pooling level `level` sits in `block_stacks`."""
        for index, (r, lev, _) in enumerate(self.block_stacks):
            if (r, lev) == (role, level):
                return index
        raise ValueError(f"no {role!r} residual stack at level {level} in this config")

    def output_init_blocks(self, role: str, level: int) -> int:
        """num_blocks of the thesis' init of output projections (variance 1 / (num_blocks * fan_in)) in the stack
        `role` of `level`: 2 len(down) + 2 len(up) + 1 inside a SkipBlock (its UpPool too), 2 len(stack) for the
        inner stack."""
        pairs = self.level_layers[level]
        return 2 * pairs if role == "inner" else 4 * pairs + 1

    def validate_poolformer(self):
        """Raise `ValueError` naming the first invalid field and what it allows (the rules are `_RULES`)."""
        for field, ok, expected in _RULES:
            if not ok(getattr(self, field), self):
                raise ValueError(f"PoolformerConfig.{field}={getattr(self, field)!r} is invalid: expected "
                                 f"{expected.format(c=self)}.")


def _is_int(v, minimum=None):
    return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_of(*choices):
    return lambda v, c: isinstance(v, str) and v in choices


def _is_bool(v, c):
    return isinstance(v, bool)


def _is_token(v, c):
    return _is_int(v, 0) and v < c.vocab_size


def _divides(total_field):
    return lambda v, c: _is_int(v, 1) and getattr(c, total_field) % v == 0


# every check of `PoolformerConfig.validate_poolformer`, in order: (field, ok(value, config), what it allows)
_RULES = (
    ("vocab_size", lambda v, c: _is_int(v, 2), "an int >= 2"),
    ("hidden_size", lambda v, c: _is_int(v, 2) and v % 2 == 0,
     "a positive even int (the sinusoidal embedding uses D/2 frequencies)"),
    ("pooling_factors", lambda v, c: isinstance(v, list) and all(_is_int(p, 2) for p in v),
     "a list of ints >= 2 (an empty list means no pooling)"),
    ("layers_per_level", lambda v, c: _is_int(v, 1) or (isinstance(v, list) and len(v) == c.num_levels
                                                         and all(_is_int(n, 1) for n in v)),
     "an int >= 1 or a list of {c.num_levels} ints >= 1 (len(pooling_factors) + 1)"),
    ("complex_recurrence", _is_bool, "True or False"),
    ("lru_width", lambda v, c: _is_int(v, 1) and (v % 2 == 0 or not c.complex_recurrence),
     "a positive int, even for a complex recurrence"),
    ("num_gate_blocks", lambda v, c: _is_int(v, 1) and c.lru_width % v == 0 and c.num_recurrent_units % v == 0,
     "a positive int dividing lru_width ({c.lru_width}) and the number of recurrent units ({c.num_recurrent_units})"),
    ("recurrence_scale", lambda v, c: _is_number(v) and v > 0, "a number > 0"),
    ("r_min", lambda v, c: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    ("r_max", lambda v, c: _is_number(v) and c.r_min <= v < 1, "a number in [r_min={c.r_min}, 1)"),
    ("max_phase", lambda v, c: _is_number(v) and 0 <= v <= 2, "a number in [0, 2] (times pi)"),
    ("conv1d_width", lambda v, c: _is_int(v, 0), "an int >= 0 (0 = no conv)"),
    ("conv1d_groups", _divides("hidden_size"), "a positive int dividing hidden_size ({c.hidden_size})"),
    ("mlp_expansion", lambda v, c: _is_int(v, 1), "an int >= 1"),
    ("gated", _is_bool, "True or False"),
    ("hidden_act", lambda v, c: v in ACT2CLS, "an activation name of transformers' ACT2FN: " + str(sorted(ACT2CLS))),
    ("norm", _one_of(*_NORMS), f"one of {_NORMS}"),
    ("norm_eps", lambda v, c: _is_number(v) and v > 0, "a number > 0"),
    ("pooling", _one_of(*_POOLINGS), f"one of {_POOLINGS}"),
    ("pooling_groups", _divides("hidden_size"), "a positive int dividing hidden_size ({c.hidden_size})"),
    ("causal_shift", _one_of(*_SHIFTS), f"one of {_SHIFTS}"),
    ("skip", _one_of(*_SKIPS), f"one of {_SKIPS}"),
    ("embedding", _one_of(*_EMBEDDINGS), f"one of {_EMBEDDINGS}"),
    ("dropout", lambda v, c: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("sqrt_max_gradient", lambda v, c: _is_number(v) and v > 0, "a number > 0"),
    ("scan_implementation", _one_of(*SCAN_IMPLEMENTATIONS), f"one of {SCAN_IMPLEMENTATIONS}"),
    ("scan_chunk_size", lambda v, c: _is_int(v, 0), "an int >= 0 (0 = auto)"),
    ("fused_rglru", lambda v, c: v is None or _is_bool(v, c), "None, True or False"),
    ("activation_checkpointing", _is_bool, "True or False"),
    ("checkpoint_chunk_size", lambda v, c: _is_int(v, 0), "an int >= 0 (0 = off)"),
    ("sample_rate", lambda v, c: _is_int(v, 1), "a positive int (Hz)"),
    ("quantization", lambda v, c: v in _QUANTIZATIONS and (v != "bytes" or c.vocab_size == 256),
     f"one of {_QUANTIZATIONS}; 'bytes' needs vocab_size 256 (one token per byte value)"),
    ("output_head", lambda v, c: v in _OUTPUT_HEADS and (v == "softmax" or math.isqrt(c.vocab_size) ** 2 == c.vocab_size),
     f"one of {_OUTPUT_HEADS}; 'dual-softmax' needs a square vocab_size (65536 = 256 x 256 for 16-bit PCM)"),
    ("bos_token_id", lambda v, c: _is_int(v, 0) and v < c.vocab_size, "an int in [0, vocab_size={c.vocab_size})"),
    ("eos_token_id", lambda v, c: v is None or _is_token(v, c) or (isinstance(v, list) and len(v) > 0
                                                                    and all(_is_token(t, c) for t in v)),
     "None, or an int or a non-empty list of ints in [0, vocab_size={c.vocab_size})"),
    ("pad_token_id", lambda v, c: v is None or _is_token(v, c), "None or an int in [0, vocab_size={c.vocab_size})"),
    ("use_cache", _is_bool, "True or False"),
)
_FIELDS = tuple(field for field, _, _ in _RULES)


def _warn_near_misses(kwargs: dict):
    """Configs keep unknown keys (transformers' rule); one that is close to a field's name (difflib's ratio >= 0.85:
    a dropped, doubled, swapped or wrong letter in a name of this length) is warned about, since the field then
    silently keeps its default."""
    for key in kwargs:
        if key in _FIELDS:
            continue
        for field in difflib.get_close_matches(key, _FIELDS, n=1, cutoff=0.85):
            warnings.warn(f"PoolformerConfig: unknown key {key!r} is kept but not used; did you mean {field!r}?",
                          UserWarning, stacklevel=3)


def audio_generation_config(config: PoolformerConfig, seconds: float = 1.0) -> GenerationConfig:
    """The generation settings saved beside every model this project writes (`hub_configs/`, `train.py`, the
    converter): sample the full distribution at temperature 1 from the zero token, `seconds` of audio per call.
    `generate` reads them from the saved `generation_config.json`; the model classes set none of their own."""
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, bos_token_id=config.bos_token_id,
                            max_new_tokens=int(round(config.sample_rate * seconds)))


def text_generation_config(config: PoolformerConfig, new_bytes: int = 512) -> GenerationConfig:
    """The generation settings of a byte model (`quantization="bytes"`): sample the full distribution at temperature
    1 from the start byte, `new_bytes` bytes per call; no end token (the separator byte is also the start symbol)."""
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, bos_token_id=config.bos_token_id,
                            max_new_tokens=new_bytes)


__all__ = ["SCAN_IMPLEMENTATIONS", "PoolformerConfig", "audio_generation_config", "text_generation_config"]
