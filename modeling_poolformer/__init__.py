"""Poolformer for transformers. Importing this package registers the classes with the Auto classes, so a saved
folder also loads without `trust_remote_code` in a process that imported it."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .audio import PoolformerAudioStreamer, decode_audio, encode_audio
from .configuration_poolformer import PoolformerConfig, audio_generation_config, text_generation_config
from .modeling_poolformer import (
    PoolformerCache,
    PoolformerForCausalLM,
    PoolformerModel,
    PoolformerPreTrainedModel,
    nats_to_bits,
)
from .scan import linear_scan, sequential_scan
from .text import PoolformerTextStreamer, decode_text, encode_text

# `save_pretrained` then writes `auto_map` and copies the modeling files: a saved folder is a complete Hub repo
PoolformerConfig.register_for_auto_class()
PoolformerModel.register_for_auto_class("AutoModel")
PoolformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

AutoConfig.register(PoolformerConfig.model_type, PoolformerConfig, exist_ok=True)
AutoModel.register(PoolformerConfig, PoolformerModel, exist_ok=True)
AutoModelForCausalLM.register(PoolformerConfig, PoolformerForCausalLM, exist_ok=True)

__all__ = [
    "PoolformerAudioStreamer",
    "PoolformerCache",
    "PoolformerConfig",
    "PoolformerForCausalLM",
    "PoolformerModel",
    "PoolformerPreTrainedModel",
    "PoolformerTextStreamer",
    "audio_generation_config",
    "decode_audio",
    "decode_text",
    "encode_audio",
    "encode_text",
    "linear_scan",
    "nats_to_bits",
    "sequential_scan",
    "text_generation_config",
]
