"""The engine child: the supervised process a worker streams from (`server`, step 4),
llama-server by default or any OpenAI-compatible server (`common.engines`), and the
llama-server binary and its environment (`binary`)."""

from __future__ import annotations

from workers.engine.server import EngineServer

__all__ = ["EngineServer"]
