"""Train the SC09 digit classifier used by the sample-quality metrics (FID, IS, mIS, AM).

    python training/train_classifier.py --out classifier.safetensors                 # built-in spoken digits
    python training/train_classifier.py --dataset path/to/sc09 --epochs 30 --out sc09_classifier.safetensors

The data is read with the SC09 protocol (digit folders, official lists); clips pass through the same 8-bit
quantisation as the language model's data, so real and generated clips carry the same quantisation noise.
Prints validation and test accuracy; writes a safetensors file that `evaluate.py --classifier` loads.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))
from data import DIGITS, AudioSpec, AudioTokenDataset, load_splits  # noqa: E402
from metrics import DigitClassifier  # noqa: E402

from modeling_poolformer import decode_audio  # noqa: E402


class DigitClips(torch.utils.data.Dataset):
    """(waveform of `seconds` at the model rate after the 8-bit round trip, digit label) pairs."""

    def __init__(self, data, quantization="mu-law", sample_rate=16000):
        self.tokens = AudioTokenDataset(data, AudioSpec(sample_rate=sample_rate, quantization=quantization,
                                                         seq_len=sample_rate, mode="pad"), "classifier")
        paths = [data[row]["path"] for row, _ in self.tokens.index]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="SC09-layout folder or Hub repo (default: built-in spoken digits)")
    p.add_argument("--cache_dir")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--quantization", default="mu-law", choices=("mu-law", "linear"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    _, splits = load_splits(args.dataset, "sc09", cache_dir=args.cache_dir)
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
