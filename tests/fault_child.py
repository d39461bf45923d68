"""`clinlinker link` in a child process that stops at a point of the deltalake write, for the
fault tests (tests/test_faults.py): they kill it there, or let another write commit first.

    python tests/fault_child.py SPEC_JSON

SPEC_JSON: ``argv`` (the CLI's arguments), ``pause_at`` (``staged``: after the write's files
are staged; ``commit``: before its first commit), ``ready`` (a file created on arrival),
``go`` (a file whose creation lets it go on; absent: wait until killed). Exits with the CLI's
status.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable


def pause(spec: dict[str, Any]) -> None:
    Path(spec["ready"]).write_text("ready")
    go = Path(spec["go"]) if spec.get("go") else None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if go is not None and go.exists():
            return
        time.sleep(0.05)
    raise SystemExit(3)


def pausing(real: Callable[..., Any], spec: dict[str, Any], before: bool) -> Callable[..., Any]:
    """``real``, pausing once before or after its first call."""
    done: list[bool] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = not done
        done.append(True)
        if first and before:
            pause(spec)
        result = real(*args, **kwargs)
        if first and not before:
            pause(spec)
        return result

    return wrapper


def main() -> int:
    spec = json.loads(sys.argv[1])
    from clinlinker_spark.cli import main as cli_main
    from clinlinker_spark.spark import writer

    if spec["pause_at"] == "staged":
        writer._stage = pausing(writer._stage, spec, before=False)
    elif spec["pause_at"] == "commit":
        writer._commit_merge = pausing(writer._commit_merge, spec, before=True)
    else:
        raise ValueError(spec["pause_at"])
    return cli_main(spec["argv"])


if __name__ == "__main__":
    raise SystemExit(main())
