"""Metrics: NLL in bits per sample (the training convention), FLAC's bits per sample on the same audio, and
SaShiMi's SC09 sample-quality metrics.

NLL: total NLL over every unmasked predicted sample / their count, in bits. It does not depend on the batch size.

Sample quality (SaShiMi's definitions) from a digit classifier on 32-bin log-mel spectrograms of 1 s clips:
- FID: Frechet distance between the classifier's penultimate features of generated clips and of training clips
  (torchmetrics' FrechetInceptionDistance with the classifier as its feature extractor);
- IS = exp(mean_i KL(p_i || p_mean)) over generated clips (torchmetrics' InceptionScore, one split);
- mIS = exp(mean over random pairs KL(p_i || p_j));
- AM = KL(p_train_mean || p_gen_mean) + mean_i H(p_i).
"""

import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modeling_poolformer import nats_to_bits

N_MELS = 32


# ---------------------------------------------------------------------------------------------------------------------
# NLL
# ---------------------------------------------------------------------------------------------------------------------


def nll_per_item(outputs, labels: torch.Tensor) -> tuple:
    """(total NLL in nats, number of predicted samples) per item of a batch, float64; position t predicts
    labels[:, t + 1], labels of -100 are not predicted. `outputs` is either a model's output from a forward with
    `labels` (its `sample_nll`: the same for every output head, a dual softmax never spells out its 65,536 logits)
    or a (B, T, vocab) tensor of softmax logits."""
    targets = labels[:, 1:]
    if isinstance(outputs, torch.Tensor):
        nll = F.cross_entropy(outputs[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    else:
        nll = outputs.sample_nll
    return nll.double().sum(1), (targets != -100).sum(1).double()


@torch.no_grad()
def nll_bits(model, dataloader, accelerator=None, max_batches=None, progress=False):
    """(bits per sample, total NLL in nats, number of predicted samples). Batches are dicts with `input_ids`,
    `attention_mask`, `labels` (-100 where masked); position t predicts input_ids[t + 1]. Under data parallelism
    the per-item sums go through `gather_for_metrics`, which drops the items that `accelerator.prepare` repeats
    to even out the last batch, so every item counts once."""
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    batches = dataloader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(dataloader, desc="nll", total=len(dataloader))
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        item_nll, item_count = nll_per_item(outputs, batch["labels"])
        if accelerator is not None:
            item_nll, item_count = accelerator.gather_for_metrics((item_nll, item_count))
        total += item_nll.sum()
        count += item_count.sum()
    if count.item() == 0:  # a 0.0 here would read as a perfect model
        raise ValueError("no sample was evaluated (no batch, or every label masked): there is no NLL to report; "
                         "check the split, --max_eval_batches / --max_batches and the files' readability.")
    return nats_to_bits(total / count).item(), total.item(), int(count.item())


# ---------------------------------------------------------------------------------------------------------------------
# FLAC: the lossless coder a model's bits/sample are measured against
# ---------------------------------------------------------------------------------------------------------------------

FLAC_LEVEL = "FLAC level 8 (libsndfile compression_level=1.0, the highest)"


def flac_header_bytes(data: bytes) -> int:
    """Bytes before the first audio frame of a FLAC stream: the `fLaC` marker and every metadata block (STREAMINFO,
    and whatever else the encoder wrote: a seek table, tags, padding)."""
    if data[:4] != b"fLaC":
        raise ValueError("not a FLAC stream (no fLaC marker)")
    pos = 4
    while True:
        if pos + 4 > len(data):
            raise ValueError("truncated FLAC metadata")
        last, length = data[pos] & 0x80, int.from_bytes(data[pos + 1 : pos + 4], "big")
        pos += 4 + length
        if last:
            return pos


def flac_audio_bytes(samples: np.ndarray, sample_rate: int, bits: int = 16) -> int:
    """Size in bytes of the audio frames (frame headers included, the stream's header excluded) of `samples`, an
    integer PCM array (int16 values; at 8 bits, values in [-128, 128)), coded alone as one FLAC stream at the
    highest compression level."""
    import soundfile

    samples = np.asarray(samples)
    if bits not in (8, 16):
        raise ValueError(f"FLAC is compared at 8 or 16 bits, got {bits}")
    pcm = samples.astype(np.int16) * (256 if bits == 8 else 1)  # libsndfile writes 8-bit as the high byte
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, sample_rate, format="FLAC", subtype="PCM_16" if bits == 16 else "PCM_S8",
                    compression_level=1.0)
    data = buffer.getvalue()
    return len(data) - flac_header_bytes(data)


def item_pcm(item: dict, levels: int) -> np.ndarray:
    """The integer samples of one data item (`input_ids` after the zero token, where `attention_mask` is 1) as
    signed PCM: token - levels / 2."""
    length = int(item["attention_mask"].sum()) - 1
    return (item["input_ids"][1 : 1 + length].long() - levels // 2).numpy()


def flac_bits(items, levels: int, sample_rate: int) -> dict:
    """FLAC on the same samples a model's NLL covers: each item coded alone (as the model scores each from a fresh
    state), total audio-frame bits / total samples. `items`: data items (dicts with `input_ids`,
    `attention_mask`); `levels`: 256 (the 8-bit tokens as 8-bit PCM) or 65536."""
    bits = {256: 8, 65536: 16}.get(levels)
    if bits is None:
        raise ValueError(f"the FLAC baseline needs 8- or 16-bit tokens (256 or 65536 levels), got {levels}")
    total_bytes = total_samples = 0
    for item in items:
        samples = item_pcm(item, levels)
        if len(samples):
            total_bytes += flac_audio_bytes(samples, sample_rate, bits)
            total_samples += len(samples)
    if total_samples == 0:
        raise ValueError("no sample to code with FLAC")
    return {"flac_bits_per_sample": 8 * total_bytes / total_samples, "flac_audio_bytes": total_bytes,
            "flac_samples": total_samples, "flac_items": "each item coded alone",
            "flac_convention": f"{FLAC_LEVEL}; audio frames only: the fLaC marker and metadata blocks (stream header) "
                               "are excluded, frame headers are included; / number of samples"}


# ---------------------------------------------------------------------------------------------------------------------
# The SC09 digit classifier
# ---------------------------------------------------------------------------------------------------------------------


def mel_filterbank(n_freqs, n_mels, sample_rate, f_min=20.0, f_max=None):
    """Triangular filters on the HTK mel scale, m = 2595 log10(1 + f / 700), unnormalised (peak 1): (n_freqs,
    n_mels), from librosa (the `eval` extra)."""
    import librosa

    mel = librosa.filters.mel(sr=sample_rate, n_fft=2 * (n_freqs - 1), n_mels=n_mels, fmin=f_min,
                              fmax=f_max or sample_rate / 2, htk=True, norm=None, dtype=np.float64)
    return torch.from_numpy(mel.T).float()


class LogMel(nn.Module):
    """(B, T) waveforms -> (B, 1, n_mels, frames) log-mel spectrograms (25 ms windows, 10 ms hop at 16 kHz)."""

    def __init__(self, sample_rate=16000, n_mels=N_MELS, n_fft=400, hop=160):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("mel", mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate), persistent=False)

    def forward(self, wave):
        spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, return_complex=True).abs() ** 2
        return torch.log(spec.transpose(1, 2) @ self.mel + 1e-6).transpose(1, 2).unsqueeze(1)


class DigitClassifier(nn.Module):
    """A small CNN on log-mel spectrograms of 1 s clips. `features` is the penultimate layer used for FID."""

    def __init__(self, num_classes=10, sample_rate=16000, width=32, feature_dim=128):
        super().__init__()
        self.config = dict(num_classes=num_classes, sample_rate=sample_rate, width=width, feature_dim=feature_dim)
        self.logmel = LogMel(sample_rate)
        self.norm = nn.BatchNorm2d(1)
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.1)

    def features(self, wave):
        x = self.conv(self.norm(self.logmel(wave)))
        return F.relu(self.fc(x.mean(dim=(2, 3))))

    def forward(self, wave):
        return self.head(self.dropout(self.features(wave)))

    def save(self, path):
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"config": json.dumps(self.config)})
        tmp.replace(path)

    @classmethod
    def load(cls, path):
        """A safetensors file written by `save`, or a torch file (state dict, loaded with weights_only=True)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"classifier checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as f:
                config = json.loads((f.metadata() or {}).get("config", "{}"))
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            config = state.pop("__config__", {}) if isinstance(state, dict) else {}
            if isinstance(config, str):
                config = json.loads(config)
        model = cls(**config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a DigitClassifier checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()


class _Features(nn.Module):
    """Adapter for torchmetrics: waveforms in, penultimate features (FID) or logits (IS) out."""

    def __init__(self, classifier, logits=False):
        super().__init__()
        self.classifier, self.logits = classifier, logits
        self.num_features = classifier.config["num_classes"] if logits else classifier.config["feature_dim"]

    def forward(self, wave):
        return self.classifier(wave) if self.logits else self.classifier.features(wave)


# ---------------------------------------------------------------------------------------------------------------------
# Sample quality
# ---------------------------------------------------------------------------------------------------------------------


def kl_rows(p, q):
    """KL(p_k || q_k) of each row pair, rows normalised to sum 1, with 0 log 0 = 0 and p log(p / 0) = inf (scipy's
    `rel_entr` and `entropy`, which SaShiMi's evaluator uses)."""
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def pairs_score(p, q) -> float:
    """exp(mean_k KL(p_k || q_k)): the modified inception score of the pairs (p_k, q_k)."""
    return kl_rows(p, q).mean().exp().item()


def modified_inception_score(probs, num_pairs=None, generator=None):
    """mIS = exp(mean over random pairs (i, j), i != j, of KL(p_i || p_j))."""
    n = len(probs)
    num_pairs = num_pairs or 10 * n
    i = torch.randint(0, n, (num_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (num_pairs,), generator=generator)) % n
    return pairs_score(probs[i], probs[j])


def am_score(train_probs, gen_probs):
    """AM = KL(p_train_mean || p_gen_mean) + mean entropy of the generated p_i."""
    gen = gen_probs / gen_probs.sum(-1, keepdim=True)
    entropy = -torch.special.xlogy(gen, gen).sum(-1).mean()
    return (kl_rows(train_probs.mean(0), gen_probs.mean(0)) + entropy).item()


@torch.no_grad()
def sample_quality(classifier, generated, reference, batch_size=64, seed=0):
    """FID, IS, mIS, AM of `generated` waveforms (N, T) against `reference` (training) waveforms, plus the
    classifier's predicted class histogram of the generated set."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    classifier = classifier.eval()
    fid = FrechetInceptionDistance(feature=_Features(classifier), reset_real_features=True)
    fid.set_dtype(torch.float64)

    def probs_of(waves, real):
        out = []
        for start in range(0, len(waves), batch_size):
            batch = waves[start : start + batch_size].float()
            fid.update(batch, real=real)
            out.append(classifier(batch).softmax(-1).double())
        return torch.cat(out)

    gen_probs, ref_probs = probs_of(generated, False), probs_of(reference, True)
    inception = InceptionScore(feature=_Features(classifier, logits=True), splits=1)
    for start in range(0, len(generated), batch_size):
        inception.update(generated[start : start + batch_size].float())
    torch.manual_seed(seed)  # InceptionScore shuffles before splitting
    is_mean, _ = inception.compute()
    return {
        "fid": fid.compute().item(),
        "is": is_mean.item(),
        "mis": modified_inception_score(gen_probs, generator=torch.Generator().manual_seed(seed)),
        "am": am_score(ref_probs, gen_probs),
        "class_histogram": torch.bincount(gen_probs.argmax(-1), minlength=gen_probs.shape[1]).tolist(),
    }
