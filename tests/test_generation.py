"""Cache, step-by-step decoding, generate (eager and compiled steps, padded batches, seeds), streaming, audio codec
and the sampling CLI."""

import json
import math
import re
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import soundfile
import torch
from transformers import CompileConfig

from helpers import MODEL_CONFIG_NAMES, ROOT, hub_config, hub_model
from modeling_poolformer import PoolformerAudioStreamer, PoolformerCache, decode_audio, encode_audio
from modeling_poolformer.outputs import CACHE_FIELD


def _period(config):
    return math.prod(config.pooling_factors) if config.pooling_factors else 4


@pytest.mark.compat
@pytest.mark.parametrize("shift", ["fine", "coarse"])
@pytest.mark.parametrize("name", MODEL_CONFIG_NAMES)
def test_cached_decoding_equals_full_forward(name, shift):
    model = hub_model(name, causal_shift=shift, conv1d_width=3)
    length = 3 * _period(model.config) + 7
    ids = torch.randint(0, 256, (2, length))
    with torch.no_grad():
        full = model(ids).logits
        prompt = _period(model.config) // 2 * 2 + 1  # odd-length prompt, prefilled with the parallel scan
        out = model(ids[:, :prompt], use_cache=True)
        cache, pieces, t = out.cache, [out.logits], prompt
        chunks = [1, 1, 3, 1, 7, 2, 5] + [1] * length
        for n in chunks:
            if t >= length:
                break
            n = min(n, length - t)
            out = model(ids[:, t : t + n], cache=cache, use_cache=True)
            assert out.cache is cache
            pieces.append(out.logits)
            t += n
        assert cache.get_seq_length() == length
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_cache_is_preallocated_and_written_in_place():
    model = hub_model("sc09", conv1d_width=3)
    period = _period(model.config)
    cache = PoolformerCache(model.config)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 3)), cache=cache)
        addresses = [t.data_ptr() for t in cache.states()]
        shapes = [t.shape for t in cache.states()]
        model(torch.randint(0, 256, (1, 12 * period)), cache=cache)  # a long prefill
        for _ in range(period + 1):
            model(torch.randint(0, 256, (1, 1)), cache=cache)
    # fixed shapes and addresses: the same tensors whatever the length, and no views into a prompt's activations
    assert [t.data_ptr() for t in cache.states()] == addresses and [t.shape for t in cache.states()] == shapes
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in cache.states())
    config = model.config
    assert [len(s.recurrent_states) for s in cache.stacks] == [len(s.conv_states) for s in cache.stacks] == [1] * 9
    assert [t.shape[1] for t in cache.pool_windows] == [t.shape[1] for t in cache.up_queues] == config.pooling_factors
    assert all(t.dtype == torch.float32 and t.shape[-1] == 2 for s in cache.stacks for t in s.recurrent_states)
    assert "PoolformerCache(seen_tokens=" in repr(cache)
    # every block stack has its own slot, given at construction, and every RG-LRU its place in its stack
    stacks = [m for m in model.modules() if type(m).__name__ == "PoolformerResidualStack"]
    assert sorted(m.stack_idx for m in stacks) == list(range(9))
    assert all([b.layer.layer_idx for b in stack[::2]] == [0] for stack in stacks)


def test_step_phases_select_the_active_levels():
    cache = PoolformerCache(hub_config("sc09"))  # pooling [2, 4, 4, 5]
    seen = {}
    for t in range(2 * 160):
        cache.seen_tokens = t
        phases = cache.step_phases()
        seen.setdefault(phases, []).append(t)
        assert cache.level_phases()[: sum(1 for p in phases if p)] == tuple(p for p in phases if p)
    # one canonical phase tuple per number of levels whose group the step completes
    assert sorted(seen) == [(0, 0, 0, 0), (1, 0, 0, 0), (1, 3, 0, 0), (1, 3, 3, 0), (1, 3, 3, 4)]
    assert seen[(1, 3, 3, 4)] == [159, 319] and len(seen[(1, 0, 0, 0)]) == 2 * 160 // 2 - 2 * 160 // 8


@pytest.mark.compat
def test_cache_batch_operations_match_reordered_inputs():
    model = hub_model()
    ids = torch.randint(0, 256, (3, 19))
    nxt = torch.randint(0, 256, (3, 5))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        order = torch.tensor([2, 0, 0])
        cache.reorder_cache(order)
        got = model(nxt[order], cache=cache, use_cache=True).logits
        want = model(torch.cat([ids[order], nxt[order]], 1)).logits[:, -5:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        cache = model(ids, use_cache=True).cache
        cache.batch_repeat_interleave(2)
        got = model(nxt.repeat_interleave(2, 0), cache=cache, use_cache=True).logits
        torch.testing.assert_close(got[::2], got[1::2])
        cache.batch_select_indices(torch.tensor([0, 5]))
        assert all(v.shape[0] == 2 for v in cache.states())
        cache.to("cpu")
        cache.to(torch.float64)
        assert all(v.dtype == torch.float64 for v in cache.states())
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    cache.reset()
    assert cache.get_seq_length() == 0 and all(not v.any() for v in cache.states())
    with pytest.raises(ValueError, match="holds a batch of 2, the input has 3"):
        model(nxt, cache=cache)


def _argmax_rollout(model, prompt, steps):
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.compat
@pytest.mark.parametrize("name", ["tiny", "sc09-coarse-shift"])
def test_greedy_generate_equals_argmax_rollout(name):
    model = hub_model(name)
    steps = _period(model.config) + 9
    want = _argmax_rollout(model, torch.full((1, 1), 128), steps)
    assert torch.equal(model.generate(max_new_tokens=steps, do_sample=False), want)
    prompt = torch.randint(0, 256, (2, 7))
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), _argmax_rollout(model, prompt, 12))


@pytest.mark.compat
@pytest.mark.parametrize("shift", ["fine", "coarse"])
@pytest.mark.parametrize("name", MODEL_CONFIG_NAMES)
def test_generated_logits_equal_forward_on_the_produced_sequence(name, shift):
    model = hub_model(name, causal_shift=shift)
    prompt = torch.randint(0, 256, (2, _period(model.config) + 3))  # odd length, mid-group at every level
    out = model.generate(prompt, max_new_tokens=2 * _period(model.config) + 1, return_dict_in_generate=True,
                         output_logits=True)
    with torch.no_grad():
        want = model(out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    assert (torch.stack(out.logits, 1) - want).abs().max().item() <= 1e-3


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7)])
def test_seeded_sampling_draws_from_the_models_distribution(options):
    # an explicit loop of multinomial draws with the same generator reproduces generate's tokens
    model = hub_model()
    prompt = torch.randint(0, 256, (2, 5))
    got = model.generate(prompt, max_new_tokens=30, generator=torch.Generator().manual_seed(3), **options)
    g, seq, cache = torch.Generator().manual_seed(3), prompt, PoolformerCache(model.config)
    with torch.no_grad():
        logits = model(prompt, cache=cache).logits[:, -1]
        for _ in range(30):
            token = torch.multinomial(torch.softmax(logits / options.get("temperature", 1.0), -1), 1, generator=g)
            seq = torch.cat([seq, token], 1)
            logits = model(token, cache=cache).logits[:, -1]
    assert torch.equal(got, seq)


@pytest.mark.compat
def test_generator_seed_is_reproducible_and_independent_of_global_rng():
    model = hub_model()
    a = model.generate(max_new_tokens=40, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = model.generate(max_new_tokens=40, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG did not move
    c = model.generate(max_new_tokens=40, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[0, 0] == 128  # unconditional generation starts from the zero token
    # the generator advances: two calls with one generator differ
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(model.generate(max_new_tokens=40, generator=g), model.generate(max_new_tokens=40, generator=g))


def test_threads_set_for_generation_and_restored():
    model = hub_model()
    seen = []
    model.register_forward_pre_hook(lambda *args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    model.generate(max_new_tokens=3)
    assert set(seen) == {1}  # batch 1: one thread
    seen.clear()
    model.generate(torch.randint(0, 256, (4, 2)), max_new_tokens=3, num_threads=2)
    assert set(seen) == {2} and torch.get_num_threads() == before
    seen.clear()
    model.generate(max_new_tokens=3, num_threads=None)  # None: torch's setting, untouched
    assert set(seen) == {before}
    with pytest.raises(ValueError, match="num_threads"):
        model.generate(max_new_tokens=3, num_threads=0)


@pytest.mark.compat
@pytest.mark.parametrize("shift", ["fine", "coarse"])
def test_right_padded_prompts_continue_as_alone(shift):
    model = hub_model("tiny", causal_shift=shift)
    lengths = [9, 4, 9, 1]
    prompts = [torch.randint(0, 256, (1, n)) for n in lengths]
    width = max(lengths)
    batch = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, : p.shape[1]], mask[i, : p.shape[1]] = p[0], 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=13, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert out.sequences.shape == (4, width + 13) and len(out.logits) == 13
    for i, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=13, do_sample=False, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[i, :width], batch[i])  # transformers' layout: the padded prompt, then
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, p.shape[1] :])  # the new tokens at T..T+n
        torch.testing.assert_close(torch.stack(out.logits)[:, i], torch.stack(alone.logits)[:, 0])
    # sampling with num_return_sequences keeps transformers' row order
    sampled = model.generate(batch, attention_mask=mask, max_new_tokens=5, num_return_sequences=2)
    assert sampled.shape == (8, width + 5) and torch.equal(sampled[::2, :width], batch)
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(batch, attention_mask=mask.flip(1), max_new_tokens=2)


@pytest.mark.compat
def test_beam_search_scores_are_the_models_log_likelihoods():
    # beams reorder the cache at every step: a wrong reorder gives scores that the returned sequences do not have
    model = hub_model()
    prompt = torch.randint(0, 256, (2, 6))
    out = model.generate(prompt, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits[:, 5:-1].double(), -1)
    want = logp.gather(-1, out.sequences[:, 6:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[::3, :6], prompt) and (want[::3] >= want[2::3]).all()  # best beam first


@pytest.mark.compat
def test_dict_outputs_and_streamer():
    model = hub_model()

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
    cache = getattr(res, CACHE_FIELD)  # transformers' own output: `cache` from 5.24, `past_key_values` before
    assert isinstance(cache, PoolformerCache) and cache.get_seq_length() == 6


@pytest.mark.integration  # a heavy end-to-end check: the integration tier
@pytest.mark.compat
@pytest.mark.parametrize("name,graphs", [("tiny", 1), ("sc09-pool-2", 2)])
def test_compiled_decoding_equals_eager_with_one_graph_per_stack_shape(name, graphs):
    from torch._dynamo.utils import counters

    # tiny: pooling [2, 4], every stack 1 pair -> one graph; sc09-pool-2 shrunk: stacks of 1 and 2 pairs -> two
    model = hub_model(name, layers_per_level=[1, 2]) if name == "sc09-pool-2" else hub_model(name)
    prompt = torch.randint(0, 256, (2, 5))
    kwargs = dict(max_new_tokens=21, do_sample=False, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(prompt, compile_config=CompileConfig(), **kwargs)  # fullgraph: no graph breaks
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(compiled.sequences, eager.sequences)
    assert (torch.stack(compiled.logits) - torch.stack(eager.logits)).abs().max().item() <= 1e-4
    again = model.generate(prompt, compile_config=CompileConfig(), **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs and torch.equal(again.sequences, eager.sequences)
    # the model keeps its compiled step; the cache it decoded with no longer carries it, so forwards run eagerly
    assert len(model._compiled_steps) == 1 and not hub_model(name)._compiled_steps
    assert getattr(compiled, CACHE_FIELD).step_function is None


def test_without_a_compiler_generation_decodes_eagerly_with_one_warning():
    import torch._inductor.config as inductor_config

    from modeling_poolformer.generation import can_compile

    can_compile.cache_clear()
    # torch's own patch: monkeypatch's undo deletes the setting, which hides it from inductor for later tests
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
            model = hub_model()
            with pytest.warns(UserWarning, match="No C\\+\\+ compiler"):
                first = model.generate(max_new_tokens=5, do_sample=False, compile_config=CompileConfig())
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once
                second = model.generate(max_new_tokens=5, do_sample=False, compile_config=CompileConfig())
            assert torch.equal(first, second)
    finally:
        can_compile.cache_clear()


@pytest.mark.compat
def test_audio_streamer_writes_wavs_while_generating(tmp_path):
    model = hub_model()
    sizes = []

    class Watching(PoolformerAudioStreamer):
        def _flush(self):
            super()._flush()
            if self.writers:  # the file is a valid WAV after every write
                sizes.append(soundfile.info(self.paths[0]).frames)

    streamer = Watching(model.config, tmp_path / "live.wav", chunk_size=100, progress=True, total=450)
    tokens = model.generate(max_new_tokens=450, num_return_sequences=2, streamer=streamer)
    assert [p.name for p in streamer.paths] == ["live_0.wav", "live_1.wav"]
    assert sizes == [100, 200, 300, 400, 450]
    written = model.save_wav(tokens, tmp_path / "after.wav")
    for live, after in zip(streamer.paths, written):
        assert live.read_bytes() == after.read_bytes()


def test_audio_streamer_yields_chunks_to_another_thread():
    model = hub_model()
    streamer = model.audio_streamer(chunk_size=64, timeout=120)
    result = []
    thread = threading.Thread(target=lambda: result.append(model.generate(max_new_tokens=300, streamer=streamer)))
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert [c.shape for c in chunks] == [(1, 64)] * 4 + [(1, 44)] and chunks[0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(chunks, 1), model.tokens_to_waveform(result[0]).numpy())


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
    model = hub_model()
    tokens = model.generate(max_new_tokens=800, num_return_sequences=2)
    paths = model.save_wav(tokens, tmp_path / "clip.wav")
    assert [p.name for p in paths] == ["clip_0.wav", "clip_1.wav"]
    data, rate = soundfile.read(paths[1])
    assert rate == 16000 and data.shape == (800,)
    want = model.tokens_to_waveform(tokens)[1].numpy()
    np.testing.assert_allclose(data, want, atol=1 / 32767 + 1e-6)


@pytest.mark.parametrize("name,tokens,match", [
    ("tiny", [128, 300, 5], r"must lie in \[0, 256\).*\[5, 300\]"),
    ("tiny", [128, -1, 5], r"must lie in \[0, 256\).*\[-1, 128\]"),
    ("tiny", [128.0, 3.5], "integer tensor .* got torch.float32"),
    ("tiny", [True, False], "integer tensor .* got torch.bool"),
    ("tiny-16bit", [32768, 65536], r"must lie in \[0, 65536\).*\[32768, 65536\]"),
    ("tiny-16bit", [32768, -2], r"must lie in \[0, 65536\)"),
])
def test_save_wav_refuses_tokens_that_forward_refuses(tmp_path, name, tokens, match):
    # forward refuses these ids; save_wav used to clip them into audio
    model = hub_model(name)
    tokens = torch.tensor(tokens)
    with pytest.raises(ValueError, match=match):
        model.save_wav(tokens, tmp_path / "clip.wav")
    if not tokens.dtype.is_floating_point and tokens.dtype != torch.bool:
        with pytest.raises(ValueError, match=match.split(".*")[0]):
            model(tokens[None])
    assert not (tmp_path / "clip.wav").exists()
    model.save_wav(torch.tensor([128, 0, model.config.vocab_size - 1]), tmp_path / "edges.wav")  # the range's ends


@pytest.mark.parametrize("flags,match", [
    (["--seconds", "nan"], "--seconds nan: expected a finite number > 0"),
    (["--seconds", "inf"], "--seconds inf: expected a finite number > 0"),
    (["--prompt_seconds", "nan"], "--prompt_seconds nan: expected"),
    (["--temperature", "nan"], "--temperature nan: expected"),
    (["--prompt", "speech.wav"], "--prompt speech.wav: no such file"),
    (["--out", "{tmp}/a_file/samples"], "a_file is a file"),
])
def test_sample_cli_checks_its_arguments_before_loading(tmp_path, flags, match, capsys):
    # each used to pass the checks and fail after the model was loaded (or a batch generated)
    from training.sample import SampleArguments
    from training.utils import parse_arguments

    (tmp_path / "a_file").write_text("")
    argv = ["--model", str(tmp_path), "--out", str(tmp_path / "out"), *[f.format(tmp=tmp_path) for f in flags]]
    with pytest.raises(SystemExit) as exit_:
        parse_arguments(SampleArguments, argv)
    assert exit_.value.code == 2
    assert match in capsys.readouterr().err


def test_sample_cli_refuses_a_read_only_out_before_generating(tmp_path, read_only_folder, capsys):
    from training.sample import main

    hub_model().save_pretrained(tmp_path / "model")
    for out in (read_only_folder, read_only_folder / "new"):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(tmp_path / "model"), "--out", str(out), "--seconds", "0.01", "--no_progress"])
        assert exit_.value.code == 2
        assert f"--out {out}: cannot write into {read_only_folder}" in capsys.readouterr().err
    main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--num_samples", "1", "--seconds", "0.01",
          "--no_progress"])
    out = capsys.readouterr().out
    assert "wrote 1 WAV and spectrograms.png" in out  # not "1 WAVs"
    # the bar counts samples per clip; the summary says which rate is which
    assert re.search(r"\d+ samples/s per clip, as on the bar; \d+ samples/s over all 1 clips", out), out
    info = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert info["samples_per_second"] == pytest.approx(info["samples_per_second_per_clip"])  # one clip: the same
    assert (tmp_path / "out" / "sample_0000.wav").exists()


@pytest.mark.slow
def test_sample_cli_writes_wavs_and_spectrogram(tmp_path):
    model = hub_model()
    model.save_pretrained(tmp_path / "model")
    rate = 16000
    t = np.arange(rate // 4) / rate
    soundfile.write(tmp_path / "prompt.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 22050)  # resampled to 16 kHz
    cmd = [sys.executable, str(ROOT / "training" / "sample.py"), "--model", str(tmp_path / "model"),
           "--num_samples", "3", "--batch_size", "2", "--seconds", "0.05", "--out", str(tmp_path / "out"),
           "--prompt", str(tmp_path / "prompt.wav"), "--prompt_seconds", "0.1", "--top_k", "40", "--no_progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    wavs = sorted((tmp_path / "out").glob("*.wav"))
    assert len(wavs) == 3
    data, sr = soundfile.read(wavs[0])
    assert sr == 16000 and len(data) == int(0.1 * 16000) + 800  # prompt + generated
    png = (tmp_path / "out" / "spectrograms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # --stream writes the same audio while generating (same seed)
    run = subprocess.run(cmd[:-1] + ["--stream", "--out", str(tmp_path / "streamed")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    streamed = sorted((tmp_path / "streamed").glob("*.wav"))
    assert [p.name for p in streamed] == [p.name for p in wavs]
    for a, b in zip(wavs, streamed):
        np.testing.assert_array_equal(soundfile.read(a)[0], soundfile.read(b)[0])
    assert "RTF" in run.stderr  # the progress bar shows the real-time factor

    bad = subprocess.run(cmd[:2] + ["--model", "x", "--out", "y", "--temperature", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--temperature must be > 0" in bad.stderr


@pytest.mark.slow
def test_sample_cli_checks_paths_first_and_handles_a_one_sample_clip(tmp_path):
    script = [sys.executable, str(ROOT / "training" / "sample.py"), "--out", str(tmp_path / "out"), "--no_progress"]
    bad = subprocess.run(script + ["--model", "/no/such/dir"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--model /no/such/dir: no such file or folder" in bad.stderr
    hub_model().save_pretrained(tmp_path / "model")
    bad = subprocess.run(script + ["--model", str(tmp_path / "model"), "--prompt", str(tmp_path / "missing.wav")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.wav: not a readable audio file" in bad.stderr
    assert "Loading weights" not in bad.stderr  # refused before the model was loaded
    one = subprocess.run(script + ["--model", str(tmp_path / "model"), "--num_samples", "1", "--seconds", "0.0000625"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert soundfile.info(tmp_path / "out" / "sample_0000.wav").frames == 1
    assert (tmp_path / "out" / "spectrograms.png").read_bytes()[:4] == b"\x89PNG"
