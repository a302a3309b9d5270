"""Byte models (`quantization="bytes"`): the config and its hub configs, the learned byte embedding, `decode_text`,
the text streamer, and a saved byte model loaded by remote code."""

import codecs
import io
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from helpers import HUB_CONFIGS, hub_model
from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, PoolformerTextStreamer, decode_text, encode_text


def test_bytes_config_defaults_and_rules():
    config = PoolformerConfig(quantization="bytes", embedding="learned")
    assert config.bos_token_id == 0 and config.modality == "text" and config.vocab_size == 256
    assert PoolformerConfig().modality == "audio" and PoolformerConfig().bos_token_id == 128
    with pytest.raises(ValueError, match=r"quantization='bytes' is invalid: .*vocab_size 256"):
        PoolformerConfig(quantization="bytes", vocab_size=65536, output_head="dual-softmax")


def test_enwik8_is_the_sc09_body_with_a_learned_byte_embedding():
    sc09 = json.loads((HUB_CONFIGS / "sc09" / "config.json").read_text())
    enwik8 = json.loads((HUB_CONFIGS / "enwik8" / "config.json").read_text())
    differ = {k for k in sc09.keys() | enwik8.keys() if sc09.get(k) != enwik8.get(k)}
    assert differ == {"quantization", "embedding", "bos_token_id"}
    assert (enwik8["quantization"], enwik8["embedding"], enwik8["bos_token_id"]) == ("bytes", "learned", 0)
    tiny = json.loads((HUB_CONFIGS / "tiny-bytes" / "config.json").read_text())
    assert tiny["quantization"] == "bytes" and tiny["embedding"] == "learned"
    # the sc09 model's 7,272,704 parameters plus a 256 x 128 byte table
    config = PoolformerConfig.from_pretrained(HUB_CONFIGS / "enwik8")
    assert sum(p.numel() for p in PoolformerForCausalLM(config).parameters()) == 7_272_704 + 256 * 128
    generation = json.loads((HUB_CONFIGS / "enwik8" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 0 and generation["max_new_tokens"] == 512


def test_learned_byte_embedding_is_a_trained_table():
    model = hub_model("tiny-bytes").train()
    table = model.model.embed_tokens.embed.weight
    ids = torch.tensor([[0, 65, 66, 65, 200]])
    emb = model.get_input_embeddings()(ids)
    torch.testing.assert_close(emb[0, 1], emb[0, 3])  # the same byte, the same row
    torch.testing.assert_close(emb[0], table[ids[0]])
    model(ids, labels=ids).loss.backward()
    touched = table.grad.abs().sum(-1).nonzero().flatten().tolist()
    # the rows of the bytes read before a prediction; the last byte (200) predicts nothing with a label, and
    # causality keeps every loss term from seeing it
    assert touched == [0, 65, 66]


def test_decode_text_round_trip_and_replacement():
    text = "naïve café, 東京 🙂"
    ids = encode_text(text)
    assert ids[0, 0] == 0 and bytes(ids[0, 1:].tolist()) == text.encode("utf-8")
    assert decode_text(ids[0]) == text and decode_text(ids) == [text]
    # invalid UTF-8 is replaced as Python's codec does, never raised
    raw = [0, 0x41, 0xFF, 0x42, 0xC3]  # start byte, A, a byte UTF-8 never uses, B, a lone lead byte
    assert decode_text(torch.tensor(raw)) == "A\ufffdB\ufffd"
    assert decode_text(torch.tensor(raw), bos_token_id=None) == "\x00A\ufffdB\ufffd"
    rows = torch.tensor([[0, 0xE6, 0x9D, 0xB1], [0, 0xE6, 0x9D, 0x41]])  # a whole 東, and one cut short before "A"
    assert decode_text(rows) == ["東", "\ufffdA"]
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        decode_text(torch.tensor([0, 256]))
    with pytest.raises(ValueError, match="integer"):
        decode_text(torch.tensor([0.0, 65.0]))


def test_model_text_methods_and_modality_errors():
    model = hub_model("tiny-bytes")
    ids = model.encode_text("hi")
    assert ids.tolist() == [[0, ord("h"), ord("i")]]
    assert model.decode_text(ids) == ["hi"]
    assert model.decode_text(ids, drop_bos=False) == ["\x00hi"]
    with pytest.raises(ValueError, match="decode_text"):
        model.tokens_to_waveform(ids)
    with pytest.raises(ValueError, match="byte models"):
        hub_model("tiny").decode_text(ids)


def test_streamer_holds_back_a_character_until_it_is_complete():
    out = io.StringIO()
    streamer = PoolformerTextStreamer(print_to=out, yield_text=True)
    streamer.put(torch.tensor([[0, ord("a")]]))  # the prompt: skipped
    seen = []
    for byte in "é東".encode("utf-8"):
        streamer.put(torch.tensor([byte]))
        seen.append(out.getvalue())
    streamer.put(torch.tensor([0xE6]))  # an unfinished character at the end: one U+FFFD
    streamer.end()
    assert seen == ["", "é", "é", "é", "é東"]
    assert out.getvalue() == "é東\ufffd\n"
    assert list(streamer) == [["é"], ["東"], ["\ufffd"]]


def test_streamer_matches_decode_text_while_generate_samples(tmp_path):
    model = hub_model("tiny-bytes")
    prompt = model.encode_text("ab").expand(2, -1)
    streamer = model.text_streamer(print_to=None, path=tmp_path / "s.txt", yield_text=True, timeout=60)
    result = {}
    worker = threading.Thread(target=lambda: result.update(seq=model.generate(
        prompt, max_new_tokens=40, do_sample=True, generator=torch.Generator().manual_seed(0), streamer=streamer)))
    worker.start()
    pieces = ["", ""]
    for chunk in streamer:
        pieces = [a + b for a, b in zip(pieces, chunk)]
    worker.join()
    want = [codecs.decode(bytes(row[prompt.shape[1]:].tolist()), "utf-8", "replace") for row in result["seq"]]
    assert pieces == want == streamer.texts
    assert [(tmp_path / f"s_{i}.txt").read_text(encoding="utf-8") for i in range(2)] == want
    # the prompt too, when asked; one printed row only
    out = io.StringIO()
    seq = model.generate(prompt[:1], max_new_tokens=10, do_sample=False, streamer=model.text_streamer(
        skip_prompt=False, print_to=out))
    assert out.getvalue() == model.decode_text(seq)[0] + "\n"
    with pytest.raises(ValueError, match="one row"):
        model.generate(prompt, max_new_tokens=2, streamer=model.text_streamer())


@pytest.mark.compat
def test_saved_byte_model_reloads_by_remote_code_and_generates_text(tmp_path):
    model = hub_model("tiny-bytes")
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "text.py").is_file()  # the text I/O travels with the model
    prompt = model.encode_text("Hello")
    want = model.generate(prompt, max_new_tokens=12, do_sample=False)
    torch.save(want, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'saved')!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config.quantization == "bytes" and model.config.modality == "text"
        assert model.generation_config.bos_token_id == 0
        prompt = model.encode_text("Hello")
        got = model.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, torch.load({str(tmp_path / 'want.pt')!r}))
        text = model.decode_text(got)[0]
        assert text.startswith("Hello") and isinstance(text, str)
        print("reloaded:", repr(text))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reloaded:" in run.stdout
