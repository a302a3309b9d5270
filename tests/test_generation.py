"""Cache, step-by-step decoding, generate (fast and generic paths), audio codec and the sampling CLI."""

import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from transformers import GenerationConfig, TextIteratorStreamer  # noqa: F401

from conftest import HUB_CONFIG_NAMES, ROOT, hub_config
from modeling_poolformer import PoolformerCache, PoolformerForCausalLM, decode_audio, encode_audio


def _model(name="tiny", **overrides):
    return PoolformerForCausalLM(hub_config(name, **overrides)).eval()


def _period(config):
    return math.prod(config.pooling_factors) if config.pooling_factors else 4


@pytest.mark.parametrize("shift", ["fine", "coarse"])
@pytest.mark.parametrize("name", HUB_CONFIG_NAMES)
def test_cached_decoding_equals_full_forward(name, shift):
    model = _model(name, causal_shift=shift, conv1d_width=3)
    length = 3 * _period(model.config) + 7
    ids = torch.randint(0, 256, (2, length))
    with torch.no_grad():
        full = model(ids).logits
        prompt = _period(model.config) // 2 * 2 + 1  # odd-length prompt, prefilled with the parallel scan
        out = model(ids[:, :prompt], use_cache=True)
        cache, pieces, t = out.past_key_values, [out.logits], prompt
        chunks = [1, 1, 3, 1, 7, 2, 5] + [1] * length
        for n in chunks:
            if t >= length:
                break
            n = min(n, length - t)
            out = model(ids[:, t : t + n], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            pieces.append(out.logits)
            t += n
        assert cache.get_seq_length() == length
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_cache_size_is_constant_in_generated_length():
    model = _model("sc09")
    period = _period(model.config)

    def state_numel(steps):
        cache = PoolformerCache(model.config)
        with torch.no_grad():
            model(torch.randint(0, 256, (1, steps)), past_key_values=cache, use_cache=True)
        return sum(v.numel() for v in cache.states.values()), cache

    small, _ = state_numel(3 * period)
    large, cache = state_numel(12 * period)
    assert small == large
    # and the cache of a long prefill holds no views into the prompt's activations (which would keep them alive)
    held = sum(v.untyped_storage().nbytes() for v in cache.states.values())
    assert held == sum(v.numel() * v.element_size() for v in cache.states.values())
    assert "PoolformerCache(seen_tokens=" in repr(cache)


def test_cache_batch_operations_match_reordered_inputs():
    model = _model()
    ids = torch.randint(0, 256, (3, 19))
    nxt = torch.randint(0, 256, (3, 5))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        order = torch.tensor([2, 0, 0])
        cache.reorder_cache(order)
        got = model(nxt[order], past_key_values=cache, use_cache=True).logits
        want = model(torch.cat([ids[order], nxt[order]], 1)).logits[:, -5:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        cache = model(ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)
        got = model(nxt.repeat_interleave(2, 0), past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(got[::2], got[1::2])
        cache.batch_select_indices(torch.tensor([0, 5]))
        assert all(v.shape[0] == 2 for v in cache.states.values())
        cache.to("cpu")
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.states


def _argmax_rollout(model, prompt, steps):
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("name", ["tiny", "sc09-coarse-shift"])
def test_greedy_generate_equals_argmax_rollout(name):
    model = _model(name)
    steps = _period(model.config) + 9
    want = _argmax_rollout(model, torch.full((1, 1), 128), steps)
    fast = model.generate(max_new_tokens=steps, do_sample=False)
    generic = super(PoolformerForCausalLM, model).generate(max_new_tokens=steps, do_sample=False)
    assert torch.equal(fast, want)
    assert torch.equal(generic, want)
    prompt = torch.randint(0, 256, (2, 7))
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), _argmax_rollout(model, prompt, 12))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(temperature=0.7), dict(top_k=20), dict(top_p=0.8), dict(temperature=1.3, top_k=50, top_p=0.9)],
)
def test_sampling_fast_path_matches_generic_path_for_a_seed(options):
    model = _model()
    prompt = torch.randint(0, 256, (2, 5))
    torch.manual_seed(11)
    fast = model.generate(prompt, max_new_tokens=30, do_sample=True, num_return_sequences=2, **options)
    torch.manual_seed(11)
    generic = super(PoolformerForCausalLM, model).generate(
        prompt, max_new_tokens=30, do_sample=True, num_return_sequences=2, **options
    )
    assert fast.shape == (4, 35)
    assert torch.equal(fast, generic)


def test_generator_seed_is_reproducible_and_independent_of_global_rng():
    model = _model()
    a = model.generate(max_new_tokens=40, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    b = model.generate(max_new_tokens=40, generator=torch.Generator().manual_seed(5))
    c = model.generate(max_new_tokens=40, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[0, 0] == 128  # unconditional generation starts from the zero token


def test_fast_path_used_only_when_semantics_coincide():
    model = _model()
    config, kwargs = model._prepare_generation_config(None)
    assert model._can_use_fast_generate(config, kwargs)
    for extra in [dict(num_beams=2), dict(repetition_penalty=1.2), dict(no_repeat_ngram_size=2), dict(eos_token_id=3)]:
        config, kwargs = model._prepare_generation_config(None, **extra)
        assert not model._can_use_fast_generate(config, kwargs), extra
    with pytest.raises(ValueError, match="generator"):
        model.generate(max_new_tokens=3, num_beams=2, generator=torch.Generator())


def test_beam_search_and_dict_outputs_and_streamer():
    model = _model()
    out = model.generate(torch.randint(0, 256, (2, 6)), max_new_tokens=8, num_beams=3, do_sample=False)
    assert out.shape == (2, 14)

    class Collect:
        def __init__(self):
            self.values = []
            self.ended = False

        def put(self, value):
            self.values.append(value)

        def end(self):
            self.ended = True

    streamer = Collect()
    res = model.generate(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True,
                         output_logits=True, streamer=streamer)
    assert res.sequences.shape == (1, 7) and len(res.scores) == 6 and len(res.logits) == 6
    assert torch.equal(torch.stack(res.scores, 1).argmax(-1), res.sequences[:, 1:])
    assert streamer.ended and torch.equal(torch.cat([v.reshape(-1) for v in streamer.values]), res.sequences[0])
    assert isinstance(res.past_key_values, PoolformerCache) and res.past_key_values.get_seq_length() == 6


@pytest.mark.parametrize("quantization", ["mu-law", "linear"])
def test_codec_round_trip_within_one_bin(quantization):
    x = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    q = encode_audio(x, quantization)
    assert q.min() == 0 and q.max() == 255
    y = decode_audio(q, quantization).double()

    def compand(v):
        return torch.sign(v) * torch.log1p(255 * v.abs()) / math.log1p(255) if quantization == "mu-law" else v

    # a bin is 2/256 wide in the companded domain; SaShiMi's encode scale (255.99) and decode scale (1/128)
    # differ by 0.4%, so the worst case sits just above one bin
    assert (compand(x) - compand(y)).abs().max() <= 1.01 * 2 / 256
    assert (encode_audio(y, quantization) - q).abs().max() <= 1


def test_save_wav_readable_at_16khz(tmp_path):
    model = _model()
    tokens = model.generate(max_new_tokens=800, num_return_sequences=2)
    paths = model.save_wav(tokens, tmp_path / "clip.wav")
    assert [p.name for p in paths] == ["clip_0.wav", "clip_1.wav"]
    data, rate = soundfile.read(paths[1])
    assert rate == 16000 and data.shape == (800,)
    want = model.tokens_to_waveform(tokens)[1].numpy()
    np.testing.assert_allclose(data, want, atol=1 / 32767 + 1e-6)


def test_sample_cli_writes_wavs_and_spectrogram(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "model")
    rate = 16000
    t = np.arange(rate // 4) / rate
    soundfile.write(tmp_path / "prompt.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 22050)  # resampled to 16 kHz
    cmd = [sys.executable, str(ROOT / "training" / "sample.py"), "--model", str(tmp_path / "model"),
           "--num-samples", "3", "--batch-size", "2", "--seconds", "0.05", "--out", str(tmp_path / "out"),
           "--prompt", str(tmp_path / "prompt.wav"), "--prompt-seconds", "0.1", "--top-k", "40", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    wavs = sorted((tmp_path / "out").glob("*.wav"))
    assert len(wavs) == 3
    data, sr = soundfile.read(wavs[0])
    assert sr == 16000 and len(data) == int(0.1 * 16000) + 800  # prompt + generated
    png = (tmp_path / "out" / "spectrograms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    bad = subprocess.run(cmd[:2] + ["--model", "x", "--out", "y", "--temperature", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--temperature must be > 0" in bad.stderr
