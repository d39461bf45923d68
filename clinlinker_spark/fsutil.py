"""File-system helpers shared by every artifact writer."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def publish_directory(tmp: Path, out: Path) -> None:
    """Move a fully written directory ``tmp`` to ``out`` (same file system), replacing ``out``.

    A reader never sees a half-written artifact: ``out`` is either the old directory or the
    new one. An existing ``out`` is moved aside first and deleted after the swap.
    """
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def needs_build(path: Path, marker: str, what: str, error: type[Exception]) -> bool:
    """Whether the artifact directory ``path`` is absent (``build_missing`` may build it there).

    False when ``path/marker`` exists. A ``path`` that exists without ``marker`` (a folder a
    failed copy left empty, a file, another artifact) raises ``error`` naming what is missing:
    building into it would give another artifact than the one the user pointed at.
    """
    if (path / marker).is_file():
        return False
    if path.exists():
        kind = "a file" if path.is_file() else "a folder without " + marker
        raise error(f"{what} path {path} is {kind}: build_missing builds only where the path "
                    "does not exist; fix or remove it, or point the config at the artifact")
    return True
