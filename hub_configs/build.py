"""Writes hub_configs/<name>/{config.json, generation_config.json}. Run it after changing a default:
    python hub_configs/build.py

Depth of the pooling ablations: the thesis compares models of (nearly) equal size, so the ablations with fewer
levels keep 4 pairs on each side of every SkipBlock and move the remaining (RG-LRU, MLP) pairs into the innermost
stack: every sc09 variant has 36 pairs, like the sc09 model (4 SkipBlocks x 8 + 4 innermost).
"""

import json
from pathlib import Path

from modeling_poolformer import PoolformerConfig, audio_generation_config, text_generation_config

HERE = Path(__file__).resolve().parent
SC09 = dict(pooling_factors=[2, 4, 4, 5], layers_per_level=4, hidden_size=128, dropout=0.2)

CONFIGS = {
    # the thesis' SC09 model: 16 kHz, 1 s clips, 8-bit mu-law
    "sc09": dict(SC09),
    # same architecture on the piano and YouTubeMix sets (8 s and ~8 s windows); Beethoven is linear 8-bit
    "beethoven": dict(SC09, quantization="linear"),
    "youtubemix": dict(SC09),
    # ablations of the thesis, all on SC09
    "sc09-no-pooling": dict(SC09, pooling_factors=[], layers_per_level=36),
    "sc09-pool-2": dict(SC09, pooling_factors=[2], layers_per_level=[4, 28]),
    "sc09-pool-2-4": dict(SC09, pooling_factors=[2, 4], layers_per_level=[4, 4, 20]),
    "sc09-real-rglru": dict(SC09, complex_recurrence=False),
    "sc09-no-gating": dict(SC09, gated=False),
    "sc09-rmsnorm": dict(SC09, norm="rms"),
    "sc09-groups-1": dict(SC09, pooling_groups=1),
    "sc09-long-skips": dict(SC09, skip="long"),
    "sc09-coarse-shift": dict(SC09, causal_shift="coarse"),
    # a few-thousand-parameter model for tests and demos (trains on CPU in minutes)
    "tiny": dict(
        pooling_factors=[2, 4], layers_per_level=1, hidden_size=32, lru_width=32, num_gate_blocks=4,
        pooling_groups=32, dropout=0.0,
    ),
}

# 16-bit linear PCM (65,536 tokens): the sample's high byte, then its low byte given the high one (dual softmax);
# the 65,536-row embedding table is replaced by a small MLP on the sample value
PCM16 = dict(vocab_size=65536, quantization="pcm", output_head="dual-softmax", embedding="mlp")
CONFIGS.update({
    "beethoven-16bit": dict(SC09, **PCM16),
    "youtubemix-16bit": dict(SC09, **PCM16),
    "tiny-16bit": dict(CONFIGS["tiny"], **PCM16),
})

# raw bytes (UTF-8 text, enwik8): the same bodies with a learned byte embedding (the Fourier features of a value
# order bytes by their code, which means nothing for characters); no sample rate, no audio codec; sequences start
# with the byte 0 (NUL), the document separator of the byte data (training/text_data.py)
BYTES = dict(quantization="bytes", embedding="learned")
CONFIGS.update({
    "enwik8": dict(SC09, **BYTES),
    "tiny-bytes": dict(CONFIGS["tiny"], **BYTES),
})

# clip lengths in samples: what generation produces by default
SECONDS = {"beethoven": 8, "youtubemix": 8, "beethoven-16bit": 8, "youtubemix-16bit": 8}


def main():
    for name, fields in CONFIGS.items():
        out = HERE / name
        out.mkdir(exist_ok=True)
        config = PoolformerConfig(architectures=["PoolformerForCausalLM"], **fields)
        data = config.to_diff_dict()
        for key in ("auto_map", "transformers_version"):
            data.pop(key, None)
        (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if config.quantization == "bytes":
            gen_data = text_generation_config(config).to_diff_dict()
        else:
            gen_data = audio_generation_config(config, seconds=SECONDS.get(name, 1)).to_diff_dict()
        gen_data.pop("transformers_version", None)
        (out / "generation_config.json").write_text(json.dumps(gen_data, indent=2, sort_keys=True) + "\n")
        print(f"{name}: wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
