"""Tiny random-weight GGUF models, so tests and the demo run the real llama-server.

The models speak gibberish but exercise every real code path: tokenizer, chat template,
sampling, embeddings, KV cache, slots. Their size is set by the hyperparameters, so the
placement tests can ask for a 1 MB model next to a 30 MB one.

The vocabulary has byte tokens only for 0x00-0x7F: a random model emits random tokens,
and a byte token above 0x7F would be half a UTF-8 sequence, i.e. invalid text on the wire.
Weights are f32 because q8_0 crashes this llama-server build on some CPUs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np

ARCH = "llama"
SPACE = "\u2581"  # SentencePiece's word-boundary marker "▁"

# Chatml-like; plain text markers (not special tokens) keep the vocabulary tiny.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS_TEXT = (
    "the be to of and a in that have it for not on with he as you do at this but his by "
    "from they we say her she or an will my one all would there their what so up out if "
    "about who get which go me hello world model token corral llama server queue worker"
)
_WORDS = _WORDS_TEXT.split()


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, types) of a SentencePiece-style ("llama") vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(0x80)]
    types += [gguf.TokenType.BYTE] * 0x80
    singles = [SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    words = [SPACE + w for w in dict.fromkeys(_WORDS)]
    tokens += singles + words
    types += [gguf.TokenType.NORMAL] * (len(singles) + len(words))
    # SPM merges the highest-scoring pieces first: longer pieces score higher.
    scores = [
        0.0 if t != gguf.TokenType.NORMAL else float(len(tok))
        for tok, t in zip(tokens, types, strict=True)
    ]
    return tokens, scores, [int(t) for t in types]


def make_model(
    path: str | os.PathLike[str],
    *,
    embedding: bool = False,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_ff: int = 128,
    ctx: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-weight llama GGUF to ``path`` (atomically) and return the path.

    File size is about 4 bytes x (2 x vocab x n_embd + n_layer x (attention + FFN)).
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = _vocab()
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name("corral-tiny-embed" if embedding else "corral-tiny")
        w.add_context_length(ctx)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(len(tokens))
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        if embedding:
            w.add_pooling_type(gguf.PoolingType.MEAN)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)

        w.add_tensor("token_embd.weight", rand(len(tokens), n_embd))
        for i in range(n_layer):
            blk = f"blk.{i}"
            w.add_tensor(f"{blk}.attn_norm.weight", ones(n_embd))
            w.add_tensor(f"{blk}.attn_q.weight", rand(n_head * head_dim, n_embd))
            w.add_tensor(f"{blk}.attn_k.weight", rand(n_head_kv * head_dim, n_embd))
            w.add_tensor(f"{blk}.attn_v.weight", rand(n_head_kv * head_dim, n_embd))
            w.add_tensor(f"{blk}.attn_output.weight", rand(n_embd, n_head * head_dim))
            w.add_tensor(f"{blk}.ffn_norm.weight", ones(n_embd))
            w.add_tensor(f"{blk}.ffn_gate.weight", rand(n_ff, n_embd))
            w.add_tensor(f"{blk}.ffn_up.weight", rand(n_ff, n_embd))
            w.add_tensor(f"{blk}.ffn_down.weight", rand(n_embd, n_ff))
        w.add_tensor("output_norm.weight", ones(n_embd))
        w.add_tensor("output.weight", rand(len(tokens), n_embd))

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def ensure_demo_models(data_dir: Path) -> tuple[Path, Path]:
    """Create (if missing) the demo chat and embedding models under ``data_dir/models``."""
    models = Path(data_dir) / "models"
    chat, embed = models / "corral-demo.gguf", models / "corral-demo-embed.gguf"
    # A long training context: llama-server caps each slot at min(ctx/parallel, n_ctx_train).
    if not chat.exists():
        make_model(chat, ctx=32768)
    if not embed.exists():
        make_model(embed, embedding=True, ctx=32768, seed=1)
    return chat, embed
