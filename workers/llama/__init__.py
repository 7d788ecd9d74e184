"""The llama-server child: the binary and its environment (`binary`), and the supervised
process (`server`, step 4)."""

from __future__ import annotations

from workers.llama.server import LlamaServer

__all__ = ["LlamaServer"]
