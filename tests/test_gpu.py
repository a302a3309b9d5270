"""What only a CUDA device can check: the Triton scan on the GPU, the model's numbers on CUDA against the CPU, decoding
with one CUDA graph per kind of step against eager decoding, and a bf16 train.py run that exports WAV samples.

    python -m pytest -m gpu -x          # every test here is marked `gpu`; without CUDA they are skipped

The full SC09 config runs here (random weights, seeded), not the shrunk test models: the CUDA graphs of its five
kinds of step and the inductor-compiled stacks inside them are what `generate` runs on a GPU by default.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import CompileConfig, GenerationConfig

from helpers import HUB_CONFIGS, ROOT
from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, linear_scan, sequential_scan
from modeling_poolformer.outputs import CACHE_FIELD

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
GRAPHS_OVER_EAGER = dict(compile_config=CompileConfig(backend="eager"))  # CUDA graphs of the eager kernels
EAGER = dict(disable_compile=True)


def sc09(device=CUDA, **overrides):
    torch.manual_seed(0)
    model = PoolformerForCausalLM(PoolformerConfig.from_pretrained(HUB_CONFIGS / "sc09", **overrides)).eval()
    model.generation_config = GenerationConfig.from_pretrained(HUB_CONFIGS / "sc09")
    return model.to(device)


@pytest.fixture(scope="module")
def model():
    return sc09()


def newest_graphs(model) -> dict:
    """The captured graphs (one per kind of step) of the static buffers the model used last."""
    return next(reversed(model._static_steps.values())).graphs


# ---------------------------------------------------------------------------------------------------------------------
# The Triton scan against the sequential reference
# ---------------------------------------------------------------------------------------------------------------------


def _scan_inputs(dtype, batch, length, units, requires_grad=False):
    real = dtype.to_real() if dtype.is_complex else dtype
    magnitude = torch.rand(batch, length, units, dtype=real, device=CUDA) * 0.98
    a = torch.polar(magnitude, torch.rand_like(magnitude) * 6.28) if dtype.is_complex else magnitude
    u = torch.randn(batch, length, units, dtype=dtype, device=CUDA)
    h0 = torch.randn(batch, units, dtype=dtype, device=CUDA)
    return [t.requires_grad_(requires_grad) for t in (a, u, h0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64, torch.complex128])
@pytest.mark.parametrize("batch,length,units", [(1, 1, 3), (3, 37, 5), (2, 1001, 129), (5, 4099, 64)])
def test_triton_scan_equals_sequential_on_cuda(dtype, batch, length, units):
    from modeling_poolformer.scan import triton_scan

    a, u, h0 = _scan_inputs(dtype, batch, length, units)
    tol = 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-10
    want = sequential_scan(a, u, h0)
    torch.testing.assert_close(linear_scan(a, u, h0, "triton"), want, rtol=tol, atol=tol)
    torch.testing.assert_close(linear_scan(a, u, None, "triton"), sequential_scan(a, u), rtol=tol, atol=tol)
    out, last = triton_scan(a, u, h0)
    # the last state and the last output are one expression that the compiler may contract into FMAs differently
    # for the store and for the carry: on an H200 they were up to 2 ulp apart
    torch.testing.assert_close(last, out[:, -1], rtol=tol, atol=tol)
    # carried state: two halves, the second starting from the first's last state, equal the whole
    half = max(1, length // 2)
    first, carried = triton_scan(a[:, :half], u[:, :half], h0)
    second, _ = triton_scan(a[:, half:], u[:, half:], carried) if length > 1 else (first[:, :0], None)
    torch.testing.assert_close(torch.cat([first, second], 1), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_triton_scan_in_time_chunks_equals_sequential_on_cuda(dtype):
    # batch 4 x 128 units leave most of the GPU idle: the default cuts T = 16,000 into chunks scanned in parallel;
    # decays near 1 make the state carried across chunks matter
    from modeling_poolformer.scan import triton_scan

    real = dtype.to_real() if dtype.is_complex else dtype
    magnitude = 0.999 + 0.001 * torch.rand(4, 16000, 128, dtype=real, device=CUDA)
    a = torch.polar(magnitude, torch.rand_like(magnitude) * 0.01) if dtype.is_complex else magnitude
    u = torch.randn(4, 16000, 128, dtype=dtype, device=CUDA)
    h0 = torch.randn(4, 128, dtype=dtype, device=CUDA)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    want = sequential_scan(*(t.cpu().to(wide) for t in (a, u, h0)))
    for chunks in (None, 1):
        out, last = triton_scan(a, u, h0, time_chunks=chunks)
        torch.testing.assert_close(out.cpu().to(want.dtype), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("batch,length,units", [(3, 37, 5), (2, 777, 131)])
def test_triton_scan_gradients_equal_sequential_on_cuda(dtype, batch, length, units):
    a, u, h0 = _scan_inputs(dtype, batch, length, units, requires_grad=True)
    weight = torch.randn(batch, length, units, dtype=dtype, device=CUDA)

    def grads(fn):
        loss = (fn(a, u, h0) * weight).real.sum() if dtype.is_complex else (fn(a, u, h0) * weight).sum()
        return torch.autograd.grad(loss, (a, u, h0))

    for got, want in zip(grads(lambda *x: linear_scan(*x, "triton")), grads(sequential_scan)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_triton_scan_gradcheck_on_cuda():
    a, u, h0 = _scan_inputs(torch.complex128, 2, 19, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, u, h0: linear_scan(a, u, h0, "triton"), (a, u, h0))


# ---------------------------------------------------------------------------------------------------------------------
# The model on CUDA
# ---------------------------------------------------------------------------------------------------------------------


def test_sc09_logits_on_cuda_equal_the_cpus(model):
    cpu = sc09("cpu")
    ids = torch.randint(0, 256, (2, 3200))
    with torch.no_grad():
        want = cpu(ids).logits
        got = model(ids.to(CUDA)).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stepped_equals_forward_on_cuda(model):
    ids = torch.randint(0, 256, (2, 400), device=CUDA)  # the innermost level runs at steps 159 and 319
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :37], use_cache=True)
        cache, pieces = out.cache, [out.logits]
        for t in range(37, 400):
            pieces.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding with CUDA graphs
# ---------------------------------------------------------------------------------------------------------------------


def test_greedy_with_cuda_graphs_equals_eager(model):
    prompt = torch.randint(0, 256, (2, 7), device=CUDA)
    kwargs = dict(max_new_tokens=340, do_sample=False, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(prompt, **EAGER, **kwargs)
    # graphs of the eager kernels: the same kernels replayed
    graphs = model.generate(prompt, **GRAPHS_OVER_EAGER, **kwargs)
    assert torch.equal(graphs.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(graphs.logits), torch.stack(eager.logits), rtol=0, atol=1e-5)
    assert len(newest_graphs(model)) == 5  # one graph per kind of step: 0..4 levels complete a group
    # the default: graphs over the inductor-compiled stacks
    compiled = model.generate(prompt, compile_config=CompileConfig(), **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-4, atol=1e-4)
    assert len(newest_graphs(model)) == 5
    # the cache handed back holds the eager decoding's state in its own tensors
    for a, b in zip(getattr(compiled, CACHE_FIELD).states(), getattr(eager, CACHE_FIELD).states()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_default_long_generation_uses_graphs_and_seeded_sampling_is_reproducible(model):
    # max_new_tokens >= 4000 compiles by default: the call that crashed before
    def sample(seed):
        return model.generate(max_new_tokens=4000, generator=torch.Generator(device=CUDA).manual_seed(seed))

    a, b, c = sample(3), sample(3), sample(4)
    assert a.shape == (1, 4001) and torch.equal(a, b) and not torch.equal(a, c)
    assert len(newest_graphs(model)) == 5
    # the same draws as eager decoding with the same generator (graphs of the eager kernels)
    got = model.generate(max_new_tokens=400, generator=torch.Generator(device=CUDA).manual_seed(5), **GRAPHS_OVER_EAGER)
    want = model.generate(max_new_tokens=400, generator=torch.Generator(device=CUDA).manual_seed(5), **EAGER)
    assert torch.equal(got, want)


def test_beams_return_sequences_padding_and_a_users_cache_with_cuda_graphs(model):
    prompt = torch.randint(0, 256, (2, 6), device=CUDA)
    beams = dict(max_new_tokens=170, num_beams=3, num_return_sequences=3, do_sample=False, length_penalty=0.0,
                 return_dict_in_generate=True, output_scores=True)
    got, want = model.generate(prompt, **GRAPHS_OVER_EAGER, **beams), model.generate(prompt, **EAGER, **beams)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)

    sampled = dict(max_new_tokens=200, num_return_sequences=4)
    got = model.generate(prompt, generator=torch.Generator(device=CUDA).manual_seed(1), **GRAPHS_OVER_EAGER, **sampled)
    want = model.generate(prompt, generator=torch.Generator(device=CUDA).manual_seed(1), **EAGER, **sampled)
    assert got.shape == (8, 206) and torch.equal(got, want)

    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], device=CUDA)
    padded = dict(attention_mask=mask, max_new_tokens=170, do_sample=False)
    assert torch.equal(model.generate(prompt, **padded, **GRAPHS_OVER_EAGER), model.generate(prompt, **padded, **EAGER))

    with torch.no_grad():
        cache = model(prompt[:, :-1], use_cache=True).cache
    own = cache.states()
    out = model.generate(prompt, cache=cache, max_new_tokens=170, do_sample=False, compile_config=CompileConfig())
    assert all(a is b for a, b in zip(cache.states(), own)) and cache.get_seq_length() == 5 + 170
    with torch.no_grad():
        torch.testing.assert_close(model(out[:, -1:], cache=cache).logits, model(out).logits[:, -1:], rtol=1e-4,
                                   atol=1e-4)


def test_train_py_bf16_run_exports_wav_samples(tmp_path):
    pytest.importorskip("datasets", reason="train.py needs the train extra (datasets)")
    import soundfile

    from training.spoken_digits import make_spoken_digits

    def tones(text, voice, speed, pitch):  # a tone per digit and voice: SC09's layout without espeak-ng
        rate, f0 = 16000, 200.0 + 40 * len(text) + pitch + speed / 10
        t = np.arange(int(rate * 0.5)) / rate
        return (0.4 * np.sin(2 * math.pi * f0 * t) * np.hanning(t.size)).astype(np.float32), rate

    data = make_spoken_digits(tmp_path / "tones", voices=["a", "b", "c", "d"], variants=[(150, 40), (170, 60)],
                              render=tones)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # 0.3 s = 4800 samples per clip: generate's default compiled step, i.e. CUDA graphs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", str(ROOT / "training" / "train.py"),
           "--model_config", str(HUB_CONFIGS / "sc09"), "--dataset", str(data), "--output_dir", str(out),
           "--max_steps", "3", "--eval_every", "3", "--max_eval_batches", "1", "--seq_len", "3200", "--batch_size", "4",
           "--num_samples", "2", "--sample_seconds", "0.3", "--log_with", "none", "--warmup_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 3 and summary["sample_errors"] == []
    for i in range(2):
        wave, rate = soundfile.read(out / "model" / "samples" / f"sample_{i}.wav")
        assert rate == 16000 and wave.shape == (4800,)  # the zero token it starts from is not audio
    loaded = PoolformerForCausalLM.from_pretrained(out / "model").to(CUDA).eval()
    assert loaded.generate(max_new_tokens=4, do_sample=False).shape == (1, 5)


# ---------------------------------------------------------------------------------------------------------------------
# The residual blocks' fused gated output: the Triton GELU-gate kernels against the numba ones, and fp32 training of
# sc09 with the fused switch against the composite, on the GPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_cuda_gelu_gate_kernels_equal_numba(dtype, approximate):
    from modeling_poolformer.gelu_gate import gelu_gate, gelu_gate_backward

    b, g, grad = (torch.randn(3, 4000, 256, dtype=torch.float64) * 3 for _ in range(3))
    b, g, grad = (t.to(dtype) for t in (b, g, grad))
    want = [gelu_gate(b, g, approximate, "numba"), *gelu_gate_backward(grad, b, g, approximate, "numba")]
    got = [gelu_gate(b.to(CUDA), g.to(CUDA), approximate, "triton"),
           *gelu_gate_backward(grad.to(CUDA), b.to(CUDA), g.to(CUDA), approximate, "triton")]
    for x, y in zip(got, want):
        rtol = 2**-7 if dtype == torch.bfloat16 else 1e-5  # one bf16 ulp (rounding of two fp32 results)
        torch.testing.assert_close(x.cpu().double(), y.double(), rtol=rtol, atol=1e-5 * y.abs().max().item())


def test_cuda_fused_blocks_training_equals_composite():
    torch.manual_seed(0)
    composite_model = sc09(fused_rglru=False, dropout=0.0).train()
    fused_model = sc09(fused_rglru=True, dropout=0.0).train()
    fused_model.load_state_dict(composite_model.state_dict())
    ids = torch.randint(0, 256, (2, 4000), device=CUDA)
    outputs = [m(ids, labels=ids) for m in (composite_model, fused_model)]
    for out in outputs:
        out.loss.backward()
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-4, atol=1e-4)
    for (n, a), (_, b) in zip(composite_model.named_parameters(), fused_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("compile", ["model", "blocks"])
def test_cuda_compiled_fused_training_equals_eager(compile):
    # inductor around the fused ops (opaque calls): the whole model (accelerate's --dynamo_backend inductor) or each
    # residual block, fp32, against the same model eager
    from modeling_poolformer.modeling_poolformer import PoolformerResidualBlock

    model = sc09(fused_rglru=True, dropout=0.0).train()
    ids = torch.randint(0, 256, (2, 4000), device=CUDA)
    out = model(ids, labels=ids)
    out.loss.backward()
    want = [out.logits.detach()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    try:
        if compile == "model":
            forward = torch.compile(model, fullgraph=True)
        else:
            forward = model
            for block in model.modules():
                if isinstance(block, PoolformerResidualBlock):
                    block.compile(fullgraph=True)
        out = forward(ids, labels=ids)
        out.loss.backward()
    finally:
        torch._dynamo.reset()
    got = [out.logits.detach()] + [p.grad for p in model.parameters()]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)
