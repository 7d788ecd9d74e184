"""A GGUF file's header: its metadata and tensor table, read without the `gguf` package.

Placement asks how much memory a model needs before anything loads it, often on the
request path, so this reads only what that needs: the file is memory-mapped and walked
with `struct`, long arrays (the tokenizer's vocabulary, scores, merges) are stepped over
and kept as their length, and the tensor data (gigabytes) is never touched. A model split
over several files (`name-00001-of-00003.gguf`) is read across all of them.

Anything that is not a GGUF file of version 2 or 3 raises `GGUFError` with a one-line
reason, which is how a broken model is told apart before a worker evicts anything for it.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
ARRAY_KEEP_MAX = 4096  # arrays longer than this are kept as their length only
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")

# ggml tensor types: id -> (elements per block, bytes per block), as ggml defines them
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1),
    25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip

# metadata value types: id -> struct format of one scalar (8 = string, 9 = array)
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """Not a GGUF file this reader understands (a one-line reason)."""


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, kept as its length (e.g. `tokenizer.ggml.tokens`)."""

    length: int


@dataclass
class Header:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_bytes: int = 0  # all tensors' data, across every split file
    tensor_count: int = 0
    files: list[Path] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def length(self, key: str) -> int | None:
        """The number of elements of an array field, kept whole or not."""
        value = self.metadata.get(key)
        if isinstance(value, ArrayInfo):
            return value.length
        return len(value) if isinstance(value, list) else None


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path.name}: the GGUF header is truncated")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path.name}: the GGUF header is truncated")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def skip_string(self) -> None:
        length = self.take("Q")  # first: `self.pos += self.take(...)` would lose its advance
        self.pos += length

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFError(f"{self.path.name}: unknown GGUF value type {kind}")
        return self.take(fmt)

    def array(self) -> list[Any] | ArrayInfo:
        kind, count = self.take("I"), self.take("Q")
        if count <= ARRAY_KEEP_MAX:
            return [self.value(kind) for _ in range(count)]
        if kind == _STRING:  # each string has its own length: step over them one by one
            skip: Callable[[], None] = self.skip_string
            for _ in range(count):
                skip()
        elif kind in _SCALARS:
            self.pos += count * struct.calcsize("<" + _SCALARS[kind])
        else:
            raise GGUFError(f"{self.path.name}: unsupported GGUF array of type {kind}")
        if self.pos > len(self.buf):
            raise GGUFError(f"{self.path.name}: the GGUF header is truncated")
        return ArrayInfo(count)


def _read_one(path: Path) -> Header:
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != MAGIC:
                raise GGUFError(f"{path.name} is not a GGUF file (it starts with {buf[:4]!r})")
            return _parse(_Cursor(buf, path))
    except ValueError as exc:  # mmap of an empty file
        if isinstance(exc, GGUFError):
            raise
        raise GGUFError(f"{path.name} is not a GGUF file (it is empty)") from None


def _parse(cur: _Cursor) -> Header:
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise GGUFError(f"{cur.path.name}: GGUF version {version} is not supported (2 or 3)")
    header = Header(version, tensor_count=cur.take("Q"), files=[cur.path])
    kv_count = cur.take("Q")
    for _ in range(kv_count):
        key = cur.string()
        header.metadata[key] = cur.value(cur.take("I"))
    for _ in range(header.tensor_count):
        cur.skip_string()
        dims = [cur.take("Q") for _ in range(cur.take("I"))]
        kind = cur.take("I")
        cur.take("Q")  # offset in the data section
        block = GGML_BLOCKS.get(kind)
        if block is None:
            raise GGUFError(f"{cur.path.name}: unknown ggml tensor type {kind}")
        elements = 1
        for d in dims:
            elements *= d
        header.tensor_bytes += elements // block[0] * block[1]
    return header


def split_files(path: Path) -> list[Path]:
    """Every file of a split model, given its first (`-00001-of-0000N.gguf`); else [path]."""
    m = SPLIT_NAME.match(path.name)
    if m is None:
        return [path]
    count = int(m.group("count"))
    stem = m.group("stem")
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_header(path: str | Path) -> Header:
    """The header of the model at `path` (its first file, if split), with the tensor bytes
    of all its files. Raises `GGUFError` (not a GGUF, truncated, a split file missing) or
    `OSError` (unreadable)."""
    files = split_files(Path(path))
    header = _read_one(files[0])
    for other in files[1:]:
        if not other.is_file():
            raise GGUFError(f"{files[0].name}: its split file {other.name} is missing")
        part = _read_one(other)
        header.tensor_bytes += part.tensor_bytes
        header.tensor_count += part.tensor_count
        header.files.append(other)
    return header
