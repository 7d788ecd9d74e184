"""Models found in a folder: every GGUF under `models_dir` is a model on demand, named by
its file's stem. A split model (`name-00001-of-00003.gguf`, …) is one model, `name`, loaded
from its first file. A vision projector (`mmproj-*.gguf`) is not a model of its own: it is
attached to the model beside it (the only one in its folder, or the one whose name it
carries, `mmproj-<name>…`) and passed to llama-server as `--mmproj`.

`signature` is what changes when the folder's GGUFs change (added, removed, rewritten), so
a rescan can be skipped while it stays the same.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.gguf_header import SPLIT_NAME
from common.settings import ModelConfig

log = logging.getLogger(__name__)

MMPROJ_PREFIX = "mmproj"
MAX_FILES = 10_000  # a models_dir pointed at a whole disk stops here


def gguf_files(root: Path) -> list[Path]:
    """Every `*.gguf` under `root` (following no links out of it), sorted."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if f.lower().endswith(".gguf")]
        if len(found) >= MAX_FILES:
            log.warning("models_dir %s: over %d GGUF files, the rest ignored", root, MAX_FILES)
            break
    return found


def signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in gguf_files(root):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(out)


def discover(root: Path) -> dict[str, ModelConfig]:
    """The models under `root`: alias -> a config with its path (and projector)."""
    models: dict[str, ModelConfig] = {}
    projectors: list[Path] = []
    for path in gguf_files(root):
        if path.name.lower().startswith(MMPROJ_PREFIX):
            projectors.append(path)
            continue
        split = SPLIT_NAME.match(path.name)
        if split is not None:
            if int(split.group("index")) != 1:
                continue
            alias = split.group("stem")
        else:
            alias = path.stem
        if alias in models:
            log.warning("two models named %r under %s: %s is ignored", alias, root, path)
            continue
        models[alias] = ModelConfig(model_path=path)
    for proj in projectors:
        owner = _owner_of(proj, models)
        if owner is not None:
            models[owner] = models[owner].model_copy(update={"mmproj": proj})
    return models


def _owner_of(proj: Path, models: dict[str, ModelConfig]) -> str | None:
    """The model a projector belongs to: the one whose name it carries, else the only
    model in its folder."""
    name = proj.stem.lower().removeprefix(MMPROJ_PREFIX).lstrip("-_.")
    here = [a for a, m in models.items() if m.model_path.parent == proj.parent]
    named = [a for a in here if name.startswith(a.lower()) or a.lower().startswith(name)]
    if len(named) == 1:
        return named[0]
    return here[0] if len(here) == 1 else None
