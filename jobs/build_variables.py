"""spark-submit entry point: ``spark-submit jobs/build_variables.py --config conf/variables.yaml``.

Same code as ``clinlinker variables`` (logic lives in the package); ``--validate`` works too.
"""

from __future__ import annotations

import sys

from clinlinker_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["variables", *sys.argv[1:]]))
