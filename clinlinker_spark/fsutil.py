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
