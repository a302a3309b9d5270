"""16-bit linear PCM: the dual-softmax likelihood is exact over 65,536 values, stepping equals the forward, the low
byte sees only its own sample's high byte, 16-bit files come back bit-exact, and FLAC's baseline is measured right."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from helpers import FAST, HUB_CONFIGS, ROOT, run
from modeling_poolformer import PoolformerCache, PoolformerConfig, PoolformerForCausalLM
from modeling_poolformer.audio import decode_audio, encode_audio, pcm_tokens, tokens_to_pcm16
from modeling_poolformer.modeling_poolformer import PoolformerDualSoftmaxHead
from training.data import AudioSpec, AudioTokenDataset, AudioTokenStream, DataArguments, build_datasets, load_splits
from training.metrics import flac_audio_bytes, flac_bits, flac_header_bytes, nll_bits

SMALL = dict(vocab_size=65536, quantization="pcm", output_head="dual-softmax", pooling_factors=[2, 3],
             layers_per_level=1, hidden_size=16, lru_width=16, num_gate_blocks=2, pooling_groups=16, dropout=0.0)


def small_model(**overrides):
    return PoolformerForCausalLM(PoolformerConfig(**{**SMALL, **overrides})).eval()


def random_pcm(rng, length):
    """int16 samples of a random walk (speech-like correlation) with the extremes of the range in it."""
    walk = np.cumsum(rng.normal(0, 900, length))
    pcm = np.clip(walk - walk.mean(), -32768, 32767).astype(np.int16)
    pcm[:2] = (-32768, 32767)
    return pcm


def test_config_defaults_and_errors():
    config = PoolformerConfig(**SMALL)
    assert config.bos_token_id == 32768 and config.coarse_size == 256
    assert PoolformerConfig().bos_token_id == 128  # 8-bit models unchanged
    with pytest.raises(ValueError, match="output_head.*square vocab_size"):
        PoolformerConfig(vocab_size=1000, output_head="dual-softmax")
    with pytest.raises(ValueError, match="quantization"):
        PoolformerConfig(quantization="pcm16")


def test_dual_softmax_sums_to_one_and_matches_the_loss():
    torch.manual_seed(1)
    head = PoolformerDualSoftmaxHead(PoolformerConfig(**SMALL)).double()
    with torch.no_grad():  # large random weights: far from the uniform distribution of a fresh init
        for p in head.parameters():
            p.normal_(0, 3.0)
    hidden = torch.randn(3, 5, 16, dtype=torch.float64) * 4
    log_probs = head.log_probs(hidden)
    assert log_probs.shape == (3, 5, 65536)
    torch.testing.assert_close(log_probs.double().exp().sum(-1), torch.ones(3, 5, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    targets = torch.randint(0, 65536, (3, 5))
    targets[0, 0] = -100
    nll = head.nll(hidden, targets)
    want = -log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(nll[targets != -100], want[targets != -100].to(nll.dtype), rtol=1e-5, atol=1e-4)
    assert nll[0, 0] == 0


def test_loss_is_per_sample_and_uniform_is_16_bits():
    model = small_model()
    with torch.no_grad():  # a model that predicts nothing: both softmaxes uniform
        model.lm_head.coarse_proj.weight.zero_()
        model.lm_head.coarse_proj.bias.zero_()
        model.lm_head.fine_proj.weight.zero_()
        model.lm_head.fine_proj.bias.zero_()
    ids = torch.randint(0, 65536, (2, 30))
    out = model(ids, labels=ids)
    assert out.bits_per_sample.item() == pytest.approx(16.0, abs=1e-5)
    assert out.logits is None  # the 65,536-way log-probabilities of every position are never spelled out in training
    assert model(ids, labels=ids, logits_to_keep=1).logits.shape == (2, 1, 65536)


def test_step_equals_forward_and_generate_produces_samples():
    model = small_model()
    ids = torch.randint(0, 65536, (2, 25))
    with torch.no_grad():
        full = model(ids).logits
        cache, steps = PoolformerCache(model.config), []
        steps.append(model(ids[:, :7], cache=cache).logits)  # a prefill, then one sample at a time
        for t in range(7, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    out = model.generate(ids[:, :5], max_new_tokens=12, do_sample=True, top_k=0, return_dict_in_generate=True,
                         output_logits=True, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (2, 17) and int(out.sequences.max()) < 65536
    with torch.no_grad():
        want = model(out.sequences).logits[:, 4:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), want, rtol=1e-4, atol=1e-4)


def test_causality_within_a_sample():
    """Position t's distribution over sample t + 1 depends on samples <= t only; the training loss at t equals
    -log of that distribution at the target, so the low byte's softmax sees the target's high byte (its own
    sample's) and nothing else of it, nor anything later."""
    model = small_model()
    ids = torch.randint(0, 65536, (1, 24))
    with torch.no_grad():
        base = model(ids).logits
        for t in (3, 10, 17):
            changed = ids.clone()
            changed[:, t:] = torch.randint(0, 65536, (1, ids.shape[1] - t))
            torch.testing.assert_close(model(changed).logits[:, :t], base[:, :t], rtol=1e-5, atol=1e-5)
            assert (model(changed).logits[:, t] - base[:, t]).abs().max() > 1e-4
        nll = model(ids, labels=ids).sample_nll[0, :-1]
        want = -base[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
        torch.testing.assert_close(nll, want, rtol=1e-5, atol=1e-4)
        # a different low byte of the target changes the fine term only; the coarse factor is the same
        flipped = ids.clone()
        flipped[0, 9] = flipped[0, 9] // 256 * 256 + (flipped[0, 9] % 256 + 77) % 256
        hidden = model.model(flipped).last_hidden_state[0, 8]
        coarse = torch.log_softmax(model.lm_head.coarse_proj(hidden), -1)[ids[0, 9] // 256]
        fine_nll = model(flipped, labels=flipped).sample_nll[0, 8] + coarse
        fine = torch.log_softmax(model.lm_head.fine_logits(hidden, ids[0, 9] // 256), -1)[flipped[0, 9] % 256]
        torch.testing.assert_close(fine_nll, -fine, rtol=1e-5, atol=1e-5)


def test_pcm_codec_is_exact():
    samples = torch.arange(-32768, 32768)
    tokens = pcm_tokens(samples.numpy().astype(np.int16))
    assert torch.equal(tokens, samples + 32768)
    assert torch.equal(encode_audio(samples / 32768.0, "pcm", 65536), tokens)  # float from 16-bit: exact too
    assert torch.equal(tokens_to_pcm16(tokens, "pcm", 65536).long(), samples)
    assert torch.equal((decode_audio(tokens, "pcm", 65536).double() * 32768).round().long(), samples)
    with pytest.raises(ValueError, match="PCM samples must lie in"):
        pcm_tokens(np.array([40000]))


@pytest.fixture(scope="module")
def pcm_folder(tmp_path_factory):
    """16-bit mono files at 16 kHz: WAVs and FLACs of the same samples, train/validation/test."""
    root = tmp_path_factory.mktemp("pcm16")
    rng = np.random.default_rng(0)
    clips = {}
    for split, count in (("train", 6), ("validation", 2), ("test", 2)):
        (root / split).mkdir()
        for i in range(count):
            pcm = random_pcm(rng, 1500 + 250 * i)
            fmt = "flac" if i % 2 else "wav"
            path = root / split / f"{split}_{i}.{fmt}"
            soundfile.write(path, pcm, 16000, subtype="PCM_16")
            clips[path.name] = pcm
    return root, clips


@pytest.mark.compat
def test_16bit_files_round_trip_bit_exact(pcm_folder, tmp_path):
    root, clips = pcm_folder
    config = PoolformerConfig(**SMALL)
    _, spec, sets = build_datasets(DataArguments(dataset=str(root), seq_len=4000, mode="pad",
                                                 cache_dir=str(tmp_path)), config)
    assert spec.quantization == "pcm" and spec.pcm16 and not spec.minmax  # never min-max scaled
    model = small_model()
    for split, dataset in sets.items():
        for i in range(len(dataset)):
            item = dataset[i]
            name = dataset.data[int(dataset.index[i][0])]["key"].split("/")[-1]
            length = int(item["attention_mask"].sum()) - 1
            assert item["input_ids"][0] == 32768
            assert torch.equal(item["input_ids"][1 : 1 + length], torch.from_numpy(clips[name].astype(np.int64)) + 32768)
            # tokens -> save_wav -> the same int16 samples
            (path,) = model.save_wav(item["input_ids"][: 1 + length], tmp_path / f"{name}.wav")
            back, rate = soundfile.read(path, dtype="int16")
            assert rate == 16000 and soundfile.info(path).subtype == "PCM_16"
            assert np.array_equal(back, clips[name])
    # the streamed path reads the same integers
    _, splits = load_splits(str(root), streaming=True)
    stream = AudioTokenStream(splits["test"], AudioSpec(quantization="pcm", levels=65536, bos=32768, seq_len=4000,
                                                       minmax=False), repeat=False)
    streamed = {int(item["attention_mask"].sum()) - 1: item["input_ids"] for item in stream}
    for name, pcm in clips.items():
        if name.startswith("test"):
            assert torch.equal(streamed[len(pcm)][1 : 1 + len(pcm)], torch.from_numpy(pcm.astype(np.int64)) + 32768)


def test_stereo_and_resampled_16bit_are_rounded_not_scaled(tmp_path):
    rng = np.random.default_rng(3)
    left, right = random_pcm(rng, 800), random_pcm(rng, 800)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], 1), 16000, subtype="PCM_16")
    ds = AudioTokenDataset(_one(tmp_path), AudioSpec(quantization="pcm", levels=65536, bos=32768, seq_len=800, minmax=False))
    want = np.round((left.astype(np.float64) + right) / 2).astype(np.int64)
    assert torch.equal(ds[0]["input_ids"][1:], torch.from_numpy(want) + 32768)
    with pytest.raises(ValueError, match="integer samples need a 16-bit pcm spec"):
        from training.tokens import quantize

        quantize(left, AudioSpec(quantization="mu-law"))


def _one(folder):
    from datasets import Audio, Dataset

    paths = [str(p) for p in sorted(folder.glob("*.wav"))]
    return Dataset.from_dict({"audio": paths, "path": paths}).cast_column("audio", Audio(decode=False))


def test_flac_baseline_on_known_signals():
    rng = np.random.default_rng(0)
    # white noise over the whole 16-bit range cannot be coded below 16 bits; FLAC stores it verbatim plus headers
    noise = rng.integers(-32768, 32768, 20000).astype(np.int16)
    bits = 8 * flac_audio_bytes(noise, 16000) / len(noise)
    assert 16.0 <= bits < 16.1
    # iid uniform noise of 8 bits' entropy: Rice codes reach it within a bit, never below
    small = rng.integers(-128, 128, 20000).astype(np.int16)
    assert 8.0 <= 8 * flac_audio_bytes(small, 16000) / len(small) < 9.0
    # digital silence: constant subframes, a few bytes per frame of 4,096 samples
    assert 8 * flac_audio_bytes(np.zeros(20000, np.int16), 16000) / 20000 < 0.05
    # the header that is excluded ends where the first audio frame's sync code begins
    import io

    buffer = io.BytesIO()
    soundfile.write(buffer, noise, 16000, format="FLAC", subtype="PCM_16", compression_level=1.0)
    data = buffer.getvalue()
    start = flac_header_bytes(data)
    assert data[start] == 0xFF and data[start + 1] >> 2 == 0b111110  # FLAC frame sync, 14 bits
    assert len(data) - start == flac_audio_bytes(noise, 16000)
    # 8-bit tokens are coded as 8-bit PCM: the same noise at 8 bits is 8 bits per sample plus headers
    items = [{"input_ids": torch.cat([torch.tensor([128]), torch.from_numpy(small.astype(np.int64) + 128)]),
              "attention_mask": torch.ones(len(small) + 1, dtype=torch.long)}]
    assert 8.0 <= flac_bits(items, 256, 16000)["flac_bits_per_sample"] < 8.1


@pytest.mark.integration
def test_train_evaluate_sample_16bit(pcm_folder, tmp_path):
    """train.py, evaluate.py (the model's bits beside FLAC's) and sample.py on a 16-bit model."""
    root, _ = pcm_folder
    out = tmp_path / "run"
    run(["--dataset", str(root), "--model_config", str(HUB_CONFIGS / "tiny-16bit"), *FAST, "--seq_len", "1000",
         "--max_steps", "2", "--eval_every", "2", "--output_dir", str(out)])
    summary = json.loads((out / "train_summary.json").read_text())
    assert 10 < summary["val_bits_per_sample"] < 20  # per 16-bit sample: near the uniform 16 after two steps
    assert "16-bit pcm" in (out / "model" / "README.md").read_text()
    result = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", str(out / "model"),
                           "--dataset", str(root), "--split", "test", "--seq_len", "1000", "--out", str(result)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["quantization"] == "pcm" and r["predicted_samples"] == r["flac_samples"]
    assert r["model_to_flac_ratio"] == pytest.approx(r["nll_bits_per_sample"] / r["flac_bits_per_sample"])
    assert "header" in r["flac_convention"] and "bits/sample on the same clips" in proc.stdout
    # the same NLL in process, through the metrics function
    model = PoolformerForCausalLM.from_pretrained(out / "model").eval()
    _, _, sets = build_datasets(DataArguments(dataset=str(root), seq_len=1000), model.config)
    bits, _, count = nll_bits(model, torch.utils.data.DataLoader(sets["test"], batch_size=3))
    assert count == r["predicted_samples"] and bits == pytest.approx(r["nll_bits_per_sample"], rel=1e-6)
    samples = tmp_path / "samples"
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "sample.py"), "--model", str(out / "model"),
                           "--num_samples", "2", "--seconds", "0.01", "--out", str(samples), "--no_progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wav, rate = soundfile.read(samples / "sample_0000.wav", dtype="int16")
    assert rate == 16000 and len(wav) == 160
