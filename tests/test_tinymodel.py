"""The generated GGUF models: the keys llama.cpp needs, tensor shapes, a UTF-8-safe vocab."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from corral.tinymodel import ensure_demo_models, make_model


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def test_chat_model_keys_and_shapes(tmp_path: Path) -> None:
    path = make_model(tmp_path / "chat.gguf", n_embd=64, n_layer=3, n_head=4, n_head_kv=2)
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == "corral-tiny"
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.block_count") == 3
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert "<|im_start|>" in str(_field(reader, "tokenizer.chat_template"))
    assert reader.get_field("llama.pooling_type") is None
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list)
    assert _field(reader, "llama.vocab_size") == len(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]

    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order
    assert shapes["token_embd.weight"] == (64, len(tokens))
    assert shapes["output.weight"] == (64, len(tokens))
    assert shapes["blk.2.attn_q.weight"] == (64, 64)
    assert shapes["blk.2.attn_k.weight"] == (64, 32)
    assert shapes["blk.2.ffn_down.weight"] == (128, 64)
    assert shapes["blk.0.attn_norm.weight"] == (64,)
    assert len(shapes) == 2 + 1 + 3 * 9
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    assert np.all(norm.data == 1.0)


def test_byte_tokens_are_ascii_only(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(make_model(tmp_path / "m.gguf"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert isinstance(tokens, list) and isinstance(types, list)
    byte_values = [int(tok[3:5], 16) for tok, typ in zip(tokens, types, strict=True) if typ == 6]
    assert byte_values == list(range(0x80))
    assert all(re.fullmatch(r"<0x[0-7][0-9A-F]>", tok) for tok in tokens if tok.startswith("<0x"))
    assert 250 <= len(tokens) <= 400


def test_embedding_model_and_sizes(tmp_path: Path) -> None:
    small = make_model(tmp_path / "e.gguf", embedding=True)
    reader = gguf.GGUFReader(small)
    assert _field(reader, "llama.pooling_type") == gguf.PoolingType.MEAN
    big = make_model(tmp_path / "big.gguf", n_embd=512, n_layer=2, n_ff=2048)
    assert small.stat().st_size < 1_000_000 < 20_000_000 < big.stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a.gguf", seed=7).read_bytes()
    assert a == make_model(tmp_path / "b.gguf", seed=7).read_bytes()
    assert a != make_model(tmp_path / "c.gguf", seed=8).read_bytes()


def test_ensure_demo_models_is_idempotent(tmp_path: Path) -> None:
    chat, embed = ensure_demo_models(tmp_path)
    assert chat == tmp_path / "models" / "corral-demo.gguf" and chat.is_file()
    assert embed == tmp_path / "models" / "corral-demo-embed.gguf" and embed.is_file()
    mtime = chat.stat().st_mtime_ns
    assert ensure_demo_models(tmp_path) == (chat, embed)
    assert chat.stat().st_mtime_ns == mtime
