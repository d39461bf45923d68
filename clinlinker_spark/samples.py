"""Small real data samples shipped inside the package (see ``samples/README.md``).

They let a user without the full corpora run the whole pipeline, and they back the
end-to-end tests::

    from clinlinker_spark.corpora import read_codiesp
    from clinlinker_spark.samples import sample_path

    mentions = read_codiesp(sample_path("codiesp_dev_sample.tsv"))
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

_PACKAGE = "clinlinker_spark"
_FOLDER = "samples"
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def list_samples() -> list[str]:
    """Names of the shipped sample files (data files only, sorted)."""
    folder = resources.files(_PACKAGE).joinpath(_FOLDER)
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_file() and entry.name != "README.md" and not entry.name.startswith(".")
    )


def sample_path(name: str) -> Path:
    """Filesystem path of the shipped sample file ``name`` (e.g. ``"cie10_es.csv"``).

    Works from a source checkout and from an installed wheel. When the package is imported
    from a zip archive the file is extracted to a temporary file that lives until the
    interpreter exits. Raises ``FileNotFoundError`` naming the available samples for an
    unknown name.
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"sample name must be a plain file name; got {name!r}")
    resource = resources.files(_PACKAGE).joinpath(_FOLDER).joinpath(name)
    if not resource.is_file():
        raise FileNotFoundError(
            f"no sample named {name!r}; available: {', '.join(list_samples())}"
        )
    if isinstance(resource, Path):
        return resource
    path = _extracted.enter_context(resources.as_file(resource))
    logger.debug("extracted sample %s to %s", name, path)
    return Path(path)
