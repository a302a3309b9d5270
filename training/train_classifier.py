"""Train the SC09 digit classifier used by the sample-quality metrics (FID, IS, mIS, AM).

    python training/train_classifier.py --out classifier.safetensors                 # built-in spoken digits
    python training/train_classifier.py --dataset path/to/sc09 --epochs 30 --out sc09_classifier.safetensors

The data is read with the SC09 protocol (digit folders, official lists); clips pass through the same 8-bit
quantisation as the language model's data, so real and generated clips carry the same quantisation noise.
Prints validation and test accuracy; writes a safetensors file that `evaluate.py --classifier` loads.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from modeling_poolformer import decode_audio
from training.data import DataArguments, load_splits
from training.metrics import DigitClassifier
from training.splits import DIGITS
from training.tokens import AudioSpec, AudioTokenDataset
from training.utils import UsageError, parse_arguments, usage_exit


class DigitClips(torch.utils.data.Dataset):
    """(waveform of `seconds` at the model rate after the 8-bit round trip, digit label) pairs."""

    def __init__(self, data, quantization="mu-law", sample_rate=16000):
        self.tokens = AudioTokenDataset(data, AudioSpec(sample_rate=sample_rate, quantization=quantization,
                                                         seq_len=sample_rate, mode="pad"), "classifier")
        paths = [data[int(row)]["path"] for row, _ in self.tokens.index]
        self.labels = [DIGITS.index(Path(p).parent.name) for p in paths]
        self.quantization = quantization

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = self.tokens[i]
        wave = decode_audio(item["input_ids"][1:], self.quantization) * item["attention_mask"][1:]
        return wave, self.labels[i]


def accuracy(model, loader):
    model.eval()
    right = total = 0
    with torch.no_grad():
        for wave, label in loader:
            right += (model(wave).argmax(-1) == label).sum().item()
            total += len(label)
    return right / max(total, 1)


@dataclass
class ClassifierArguments:
    out: str = field(metadata={"help": "output .safetensors file"})
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 3e-3
    quantization: Literal["mu-law", "linear"] = "mu-law"
    seed: int = 0


def main(argv=None):
    args, data_args = parse_arguments((ClassifierArguments, DataArguments), argv, __doc__)
    if data_args.protocol not in ("auto", "sc09") or data_args.seq_len or data_args.mode or data_args.no_minmax:
        usage_exit(UsageError("the classifier reads SC09 clips as they are (--protocol sc09; --seq_len, --mode and "
                              "--no_minmax do not apply)"), "train_classifier.py")
    torch.manual_seed(args.seed)

    _, splits = load_splits(data_args.dataset, "sc09", data_args.audio_column, data_args.cache_dir,
                            dataset_config=data_args.dataset_config)
    sets = {name: DigitClips(ds, args.quantization) for name, ds in splits.items()}
    loaders = {name: torch.utils.data.DataLoader(s, batch_size=args.batch_size, shuffle=(name == "train"),
                                                 generator=torch.Generator().manual_seed(args.seed))
               for name, s in sets.items()}
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, epochs=args.epochs,
                                                    steps_per_epoch=len(loaders["train"]))
    for epoch in range(args.epochs):
        model.train()
        for wave, label in loaders["train"]:
            # augmentation: random shift within the second and random gain
            shift = int(torch.randint(-1600, 1601, ()).item())
            wave = torch.roll(wave, shift, dims=1) * torch.empty(len(wave), 1).uniform_(0.5, 1.0)
            loss = F.cross_entropy(model(wave), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = accuracy(model, loaders["validation"]) if "validation" in loaders else float("nan")
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, validation accuracy {val:.3f}", flush=True)
    result = {name: accuracy(model, loader) for name, loader in loaders.items()}
    model.save(args.out)
    print(json.dumps({"accuracy": result, "out": str(args.out)}))
    return result


if __name__ == "__main__":
    main()
