"""The GGUF header reader (`common.gguf_header`) against the `gguf` package's own reader, on
generated models; and its refusals of files that are not GGUF, which is how a broken model
fails before anything is evicted for it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from common.gguf_header import GGML_BLOCKS, ArrayInfo, GGUFError, read_header, split_files
from corral.tinymodel import make_model


def test_ggml_block_table_matches_the_gguf_package() -> None:
    theirs = {int(t.value): (int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}
    assert {k: v for k, v in GGML_BLOCKS.items() if k in theirs} == theirs


def test_header_agrees_with_the_gguf_reader(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m.gguf", n_embd=128, n_ff=256, n_layer=3)
    ours = read_header(path)
    ref = gguf.GGUFReader(str(path))
    assert ours.tensor_count == len(ref.tensors)
    assert ours.tensor_bytes == sum(int(t.n_bytes) for t in ref.tensors)
    keys = ["general.architecture", "llama.block_count", "llama.embedding_length"]
    for key in [*keys, "llama.attention.head_count", "llama.context_length"]:
        assert ours.get(key) == ref.fields[key].contents(), key
    tokens = ref.fields["tokenizer.ggml.tokens"]
    assert ours.length("tokenizer.ggml.tokens") == len(tokens.data)


def _write(path: Path, tokens: int, split: tuple[int, int] | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list([f"t{i}" for i in range(tokens)])
    w.add_token_scores([0.0] * tokens)
    if split is not None:
        w.add_uint16("split.no", split[0])
        w.add_uint16("split.count", split[1])
    w.add_tensor("w", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_long_arrays_are_kept_as_their_length(tmp_path: Path) -> None:
    header = read_header(_write(tmp_path / "big-vocab.gguf", 40_000))
    assert header.get("tokenizer.ggml.tokens") == ArrayInfo(40_000)
    assert header.get("tokenizer.ggml.scores") == ArrayInfo(40_000)
    assert header.tensor_bytes == 4 * 8 * 4


def test_a_split_model_counts_every_file(tmp_path: Path) -> None:
    first = _write(tmp_path / "big-00001-of-00002.gguf", 10, (0, 2))
    _write(tmp_path / "big-00002-of-00002.gguf", 10, (1, 2))
    assert split_files(first) == [first, tmp_path / "big-00002-of-00002.gguf"]
    header = read_header(first)
    assert header.tensor_bytes == 2 * 4 * 8 * 4
    assert len(header.files) == 2
    (tmp_path / "big-00002-of-00002.gguf").unlink()
    with pytest.raises(GGUFError, match=r"split file big-00002-of-00002\.gguf is missing"):
        read_header(first)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "is empty"),
        (b"not a model at all", "is not a GGUF file"),
        (b"GGUF\x01\x00\x00\x00", "version 1 is not supported"),
        (b"GGUF\x03\x00\x00\x00\x01", "truncated"),
    ],
)
def test_not_a_gguf_is_one_line(tmp_path: Path, content: bytes, why: str) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(GGUFError, match=why) as err:
        read_header(bad)
    assert "\n" not in str(err.value)


def test_a_truncated_real_model_is_refused(tmp_path: Path) -> None:
    whole = make_model(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])  # inside the vocabulary
    with pytest.raises(GGUFError, match="truncated"):
        read_header(cut)
