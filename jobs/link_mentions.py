"""spark-submit entry point: ``spark-submit jobs/link_mentions.py --config conf/local.yaml``.

Same code as ``clinlinker link`` (logic lives in the package).
"""

from __future__ import annotations

import sys

from clinlinker_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["link", *sys.argv[1:]]))
