"""A load simulator, for scale benchmarks only: a stand-in OpenAI-compatible server that
streams tokens at a set rate using almost no CPU. It generates nothing: every token is the
same word. DESIGN.md allows it where a benchmark needs more workers than this machine can
hold engines for; it is always named as such.

A worker runs it as a model's engine (`engine: {command: [python, load_simulator.py,
--port, "{port}", ...]}`), so requests take the same path as with llama-server: the
worker's task streams from it over HTTP, and a client that leaves closes that stream.

- `GET /health`: 200 `{"status": "ok"}`; `GET /v1/models`: the one model.
- `POST /v1/chat/completions` and `/v1/completions`: always answered as a stream in the
  shape llama-server sends (a role chunk, `max_tokens` content chunks `1/--tokens-per-s`
  apart, the first after `--first-token-ms`, a finish chunk, a usage chunk, `[DONE]`); a
  request with `"stream": false` gets the assembled reply as one JSON body.

Run:  python benchmarks/load_simulator.py --port 8090 [--tokens-per-s 50] [--first-token-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

WORD = "tok "


class Simulator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.alias = args.alias
        self.gap = 1.0 / args.tokens_per_s
        self.first = args.first_token_ms / 1000
        self.default_tokens = args.default_tokens
        self.count = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, body = await read_request(reader)
            if method == "GET" and path == "/health":
                reply(writer, 200, {"status": "ok"})
            elif method == "GET" and path == "/v1/models":
                reply(writer, 200, {"object": "list", "data": [{"id": self.alias}]})
            elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                await self.complete(writer, path, json.loads(body or b"{}"))
            else:
                reply(writer, 404, {"error": {"message": f"no {method} {path}", "code": 404}})
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def complete(self, writer: asyncio.StreamWriter, path: str, body: dict[str, Any]) -> None:
        self.count += 1
        chat = path.endswith("chat/completions")
        tokens = int(body.get("max_tokens") or body.get("n_predict") or self.default_tokens)
        ident = f"sim-{self.count}"
        if not body.get("stream"):
            reply(writer, 200, whole(ident, self.alias, chat, tokens))
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        head = f'{{"id":"{ident}","object":"{kind(chat)}","created":{int(time.time())},'
        head += f'"model":"{self.alias}","choices":[{{"index":0,'
        token = event(head + (delta(chat, WORD) + ',"finish_reason":null}]}'))
        if chat:
            writer.write(event(head + '"delta":{"role":"assistant"},"finish_reason":null}]}'))
        await asyncio.sleep(self.first)
        for i in range(tokens):
            if i:
                await asyncio.sleep(self.gap)
            writer.write(token)
            await writer.drain()  # raises once the worker has closed the stream
        usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        writer.write(event(head + delta(chat, "") + ',"finish_reason":"length"}]}'))
        end = {"id": ident, "object": kind(chat), "model": self.alias, "choices": []}
        writer.write(event(json.dumps({**end, "usage": usage}, separators=(",", ":"))))
        writer.write(event("[DONE]") + b"0\r\n\r\n")


def kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def delta(chat: bool, text: str) -> str:
    return f'"delta":{{"content":"{text}"}}' if chat else f'"text":"{text}"'


def event(data: str) -> bytes:
    """One SSE event as one HTTP chunk."""
    payload = f"data: {data}\n\n".encode()
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def whole(ident: str, alias: str, chat: bool, tokens: int) -> dict[str, Any]:
    text = WORD * tokens
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
    obj = "chat.completion" if chat else "text_completion"
    return {"id": ident, "object": obj, "model": alias, "choices": [choice], "usage": usage}


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    request_line = await reader.readline()
    if not request_line:
        raise ConnectionError("closed before a request")
    method, target, _ = request_line.decode("latin-1").split(" ", 2)
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return method, target.split("?", 1)[0], body


def reply(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + raw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="load_simulator.py",
        description=(__doc__ or "").split("\nRun:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=int, required=True, help="port to listen on")
    add("--alias", default="sim", help="the model's name in replies (default: sim)")
    add("--tokens-per-s", type=float, default=50.0, help="tokens a second per stream (50)")
    add("--first-token-ms", type=float, default=0.0, help="delay to the first token (0)")
    add("--default-tokens", type=int, default=16, help="tokens without max_tokens (16)")
    return p


async def serve(args: argparse.Namespace) -> None:
    sim = Simulator(args)
    server = await asyncio.start_server(sim.handle, args.host, args.port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
