"""SC09 sample quality exactly as SaShiMi measured it (and the Poolformer thesis, and Mamba after it): the evaluator
`models/sashimi/sc09_classifier/test_speech_commands.py` of state-spaces/s4, with the ResNeXt digit classifier its
authors published (`resnext.pth` in the Hub repo krandiash/sashimi-release).

- classifier: `CifarResNeXt(nlabels=10, in_channels=1)`, saved whole as `torch.save(DataParallel(model))`. The file
  is read without running pickled code: torch's `weights_only` unpickler, allowed to build only this module's
  `CifarResNeXt` and `ResNeXtBottleneck` (standing in for the pickle's `models.resnext` classes) and torch's own
  layers. A file that holds anything else is refused.
- features: `librosa.load(sr=16000)`, padded or cut to 1 s, `librosa.feature.melspectrogram(n_mels=32)` with
  librosa's defaults, `power_to_db(ref=np.max)`: 1 x 32 x 32 per clip.
- FID on the input of `model.module.classifier` (penultimate features), `scipy.linalg.sqrtm`, retried with 1e-4 on
  the diagonals when the product is singular; IS: the samples shuffled with seed 0 and split in halves,
  exp(mean KL(p_i of the first half || mean of the second)); mIS: 10,000 random pairs (seed 0),
  exp(mean KL(p_i || p_j)); AM: KL(mean train || mean gen) + mean entropy of gen.
- the reference scores: train against itself ("Train Set Scores") and test against train ("Test Set Scores"), with
  the classifier's accuracy on each; `threshold=True` is the script's IS-tuned lower/upper cut of the samples' order.

Files are listed as the script lists them (natural order: `2.wav` before `10.wav`), since IS and the threshold
tuning depend on the order.
"""

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import metrics
from training.metrics import pairs_score
from training.splits import DIGITS

CLASSES = DIGITS  # the classifier's labels: the SC09 digits, in order


# ---------------------------------------------------------------------------------------------------------------------
# The classifier (the published file's architecture, with its parameter names)
# ---------------------------------------------------------------------------------------------------------------------


class ResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck (type C): 1x1 reduce, grouped 3x3, 1x1 expand, each with batch norm, plus a shortcut."""

    def __init__(self, in_channels, out_channels, stride, cardinality, base_width, widen_factor):
        super().__init__()
        inner = cardinality * int(base_width * out_channels / (widen_factor * 64.0))
        self.conv_reduce = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner)
        self.conv_conv = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(inner)
        self.conv_expand = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut.add_module("shortcut_conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = F.relu(self.bn_reduce(self.conv_reduce(x)))
        y = F.relu(self.bn(self.conv_conv(y)))
        return F.relu(self.shortcut(x) + self.bn_expand(self.conv_expand(y)))


class CifarResNeXt(nn.Module):
    """ResNeXt-29 for 1 x 32 x 32 mel spectrograms: a 3x3 stem, three stages of bottlenecks, 8x8 average pooling
    and `classifier`, the Linear whose input is the FID feature."""

    def __init__(self, nlabels=10, cardinality=8, depth=29, base_width=64, widen_factor=4, in_channels=1):
        super().__init__()
        self.cardinality, self.depth, self.base_width, self.widen_factor = cardinality, depth, base_width, widen_factor
        self.nlabels, self.block_depth = nlabels, (depth - 2) // 9
        self.stages = [64, 64 * widen_factor, 128 * widen_factor, 256 * widen_factor]
        self.conv_1_3x3 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.stage_1 = self._stage("stage_1", self.stages[0], self.stages[1], 1)
        self.stage_2 = self._stage("stage_2", self.stages[1], self.stages[2], 2)
        self.stage_3 = self._stage("stage_3", self.stages[2], self.stages[3], 2)
        self.classifier = nn.Linear(self.stages[3], nlabels)

    def _stage(self, name, in_channels, out_channels, stride):
        stage = nn.Sequential()
        for i in range(self.block_depth):
            stage.add_module(f"{name}_bottleneck_{i}", ResNeXtBottleneck(
                in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, self.cardinality,
                self.base_width, self.widen_factor))
        return stage

    def forward(self, x):
        x = F.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(F.avg_pool2d(x, 8, 1).view(-1, self.stages[3]))


def load_resnext(path) -> nn.Module:
    """The classifier of a file saved like SaShiMi's `resnext.pth` (a whole `DataParallel(CifarResNeXt)` module),
    unpickled with `weights_only=True`: only these classes and torch's layers can be built, nothing else runs.
    Returns the `CifarResNeXt` in eval mode, float32."""
    allowed = [
        (CifarResNeXt, "models.resnext.CifarResNeXt"), (ResNeXtBottleneck, "models.resnext.ResNeXtBottleneck"),
        nn.parallel.DataParallel, nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential, set, torch.device,
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights_only unpickler names what it refused
        raise ValueError(f"{path}: not a SaShiMi classifier checkpoint (a pickled DataParallel(CifarResNeXt)), or it "
                         f"holds objects that are not allowed to load: {e}") from None
    model = obj.module if isinstance(obj, nn.parallel.DataParallel) else obj
    if not isinstance(model, CifarResNeXt):
        raise ValueError(f"{path}: holds a {type(model).__name__}, not SaShiMi's CifarResNeXt classifier")
    return model.float().eval()


# ---------------------------------------------------------------------------------------------------------------------
# Features and the classifier's outputs
# ---------------------------------------------------------------------------------------------------------------------


def natural_key(name: str):
    """Sort key of natural order (the script's `natsorted`): runs of digits compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def labelled_files(folder) -> tuple:
    """(paths, labels) of `folder/<digit>/*.wav`, digits in class order, files in natural order."""
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        for f in sorted(os.listdir(Path(folder) / name), key=natural_key):
            if f.endswith(".wav"):
                paths.append(Path(folder) / name / f)
                labels.append(label)
    return paths, np.array(labels)


def sample_files(folder) -> list:
    """The generated clips: `folder/*.wav` in natural order."""
    return [Path(folder) / f for f in sorted(os.listdir(folder), key=natural_key) if f.endswith(".wav")]


def mel_features(clip, sample_rate: int = 16000) -> np.ndarray:
    """A path or file-like object (loaded with librosa at 16 kHz) or a float waveform at 16 kHz -> its 32 x 32
    log-mel spectrogram:
    padded or cut to 1 s, librosa's default mel spectrogram (n_fft 2048, hop 512, Slaney mel), dB re its max."""
    import librosa

    if isinstance(clip, (str, Path)) or hasattr(clip, "read"):
        if hasattr(clip, "seek"):
            clip.seek(0)
        samples, sample_rate = librosa.load(clip, sr=16000)
    else:
        samples = np.asarray(clip, dtype=np.float32)
    length = int(1 * sample_rate)
    samples = samples[:length] if len(samples) > length else np.pad(samples, (0, length - len(samples)), "constant")
    mel = librosa.feature.melspectrogram(y=samples, sr=sample_rate, n_mels=32)
    return librosa.power_to_db(mel, ref=np.max)


@torch.no_grad()
def classify(model: nn.Module, clips, batch_size: int = 128) -> tuple:
    """(softmax probabilities (N, 10), penultimate features (N, D)) of clips (paths or waveforms)."""
    features = []
    hook = model.classifier.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    probs = []
    try:
        for start in range(0, len(clips), batch_size):
            mels = np.stack([mel_features(c) for c in clips[start : start + batch_size]])
            probs.append(torch.softmax(model(torch.from_numpy(mels).float().unsqueeze(1)), dim=1))
    finally:
        hook.remove()
    return torch.cat(probs).numpy(), torch.cat(features).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Scores (SaShiMi's definitions)
# ---------------------------------------------------------------------------------------------------------------------


def fid(features_data: np.ndarray, features_gen: np.ndarray) -> float:
    from scipy import linalg

    if min(len(features_data), len(features_gen)) < 2:  # one clip's covariance is NaN, on which sqrtm never returns
        raise ValueError(f"FID needs at least 2 clips per set, got {len(features_data)} and {len(features_gen)}")
    mu_data, mu_gen = features_data.mean(axis=0), features_gen.mean(axis=0)
    sigma_data, sigma_gen = np.cov(features_data, rowvar=False), np.cov(features_gen, rowvar=False)
    try:
        covmean = linalg.sqrtm(sigma_data.dot(sigma_gen))
        if not np.isfinite(covmean).all():  # a singular product: the script's retry
            offset = np.eye(sigma_data.shape[0]) * 1e-4
            covmean = linalg.sqrtm((sigma_data + offset).dot(sigma_gen + offset))
    except ValueError:
        return float("inf")
    # sqrtm may return a complex matrix with a tiny imaginary part; the script keeps it and prints a complex number
    # whose real part is the score
    return float(np.real(np.sum(np.square(mu_gen - mu_data)) + np.trace(sigma_gen + sigma_data - 2 * covmean)))


# IS and mIS seed numpy's global RNG, as the script does: its threshold tuning then draws from where mIS left it,
# which is part of what it measures. Call them in the script's order to reproduce its numbers.


def inception_score(probs: np.ndarray) -> float:
    from scipy.stats import entropy

    np.random.seed(0)
    shuffled = probs[np.random.permutation(len(probs))]
    first, second = shuffled[: len(probs) // 2], shuffled[len(probs) // 2 :]
    mean_second = second.mean(axis=0)
    return float(np.exp(entropy(first, np.repeat(mean_second[None, :], len(first), axis=0)).mean()))


def modified_inception_score(probs: np.ndarray, pairs: int = 10000) -> float:
    np.random.seed(0)  # the script's pairs, drawn one call at a time as it draws them
    index = np.array([np.random.choice(np.arange(len(probs)), size=2, replace=True) for _ in range(pairs)])
    return pairs_score(torch.from_numpy(probs[index[:, 0]]), torch.from_numpy(probs[index[:, 1]]))


def am_score(probs_data: np.ndarray, probs_gen: np.ndarray) -> float:
    return metrics.am_score(torch.from_numpy(probs_data), torch.from_numpy(probs_gen))


def scores(features_ref, probs_ref, features, probs) -> dict:
    return {"fid": fid(features_ref, features), "is": inception_score(probs),
            "mis": modified_inception_score(probs), "am": am_score(probs_ref, probs)}


def tuned_threshold_scores(features_ref, probs_ref, features, probs) -> dict:
    """The script's `--threshold`: half the samples (drawn with numpy's global RNG as the test-set mIS left it, as in
    the script) tune a lower and upper cut of the sample order by IS; the other half is scored within the cut."""
    n = len(probs) // 2
    tune = sorted(np.random.choice(len(probs), size=n, replace=False))
    held = sorted(set(range(len(probs))) - set(tune))
    values = {(lo, hi): inception_score(probs[tune][int(lo * n) : int(hi * n)])
              for lo in np.arange(0.0, 0.5, 0.1) for hi in np.arange(0.6, 1.0, 0.05)}
    best = list(values)[-1]  # the script keeps the last pair it visits (its `best_value` never changes)
    for key, value in values.items():
        if value > 0.0:
            best = key
    lo, hi = int(best[0] * n), int(best[1] * n)
    return {"thresholds": [float(best[0]), float(best[1])], "tuning_is": values[best],
            **scores(features_ref, probs_ref, features[held][lo:hi], probs[held][lo:hi])}


def split_files(items) -> tuple:
    """(clips, labels) of SC09 clips given by path (a split of `training.data`), or as (`<digit>/<file>` name,
    what librosa loads: a path or a file-like object) pairs, each labelled by its digit, in the script's order:
    digits in class order, files in natural order."""
    rows = []
    for item in items:
        name, source = (item, Path(item)) if isinstance(item, (str, Path)) else item
        digit = Path(name).parent.name
        if digit in CLASSES:
            rows.append((CLASSES.index(digit), natural_key(Path(name).name), source))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows], np.array([r[0] for r in rows])


def sashimi_quality(classifier_path, train, test, samples, threshold: bool = False, batch_size: int = 128) -> dict:
    """Everything `test_speech_commands.py` prints: the classifier's accuracy on train and test, the train-vs-train
    and test-vs-train reference scores, and the samples' scores (and the threshold-tuned ones when asked). `train`
    and `test` are folders of `<digit>/*.wav` or lists of such files' paths; `samples` is a folder of WAVs or a list
    of 16 kHz waveforms."""
    model = load_resnext(classifier_path)
    train_paths, train_labels = labelled_files(train) if isinstance(train, (str, Path)) else split_files(train)
    test_paths, test_labels = labelled_files(test) if isinstance(test, (str, Path)) else split_files(test)
    train_probs, train_features = classify(model, train_paths, batch_size)
    test_probs, test_features = classify(model, test_paths, batch_size)
    clips = sample_files(samples) if isinstance(samples, (str, Path)) else list(samples)
    probs, features = classify(model, clips, batch_size)
    out = {
        "classifier": str(classifier_path),
        "train_accuracy": float((train_probs.argmax(1) == train_labels).mean()),
        "test_accuracy": float((test_probs.argmax(1) == test_labels).mean()),
        "train_set": scores(train_features, train_probs, train_features, train_probs),
        "test_set": scores(train_features, train_probs, test_features, test_probs),
        "num_samples": len(clips),
    }
    if threshold:  # first, as in the script: the tuning draws from where the test set's mIS left numpy's RNG
        out["samples_tuned"] = tuned_threshold_scores(train_features, train_probs, features, probs)
    out["samples"] = scores(train_features, train_probs, features, probs)
    return out
