"""Which calibration gives a ranker's confidence the smaller error on mentions it did not see?

    .venv/bin/python benchmarks/calibration_methods.py --config conf/train_ranker_distemist.yaml
    .venv/bin/python benchmarks/calibration_methods.py --config conf/local.yaml

Recomputes what ``clinlinker train-ranker`` computes for ``--config`` (out-of-fold features,
cross-fitted ranker scores, the top candidate's raw confidence per training mention), then
calibrates each fold with a map fitted on the other folds, two ways: isotonic regression (what
the ranker ships, :class:`clinlinker_spark.ranker.Calibration`) and Platt scaling (a logistic
regression on the logit of the raw confidence). Prints one JSON line: mentions, out-of-fold
acc@1 and the expected calibration error (10 bins) of the raw confidence and of each map.
Nothing is written. Needs the config's index and encoder (build them first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Callable

import numpy as np


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).reshape(-1, 1)


def platt_fit(raws: np.ndarray, right: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Platt scaling fitted on (``raws``, ``right``): raw confidence -> probability."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e6).fit(_logit(raws), right)
    return lambda raw: model.predict_proba(_logit(raw))[:, 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a train-ranker job config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from clinlinker_spark.config import RankerConfig, load_config
    from clinlinker_spark.evaluation import expected_calibration_error
    from clinlinker_spark.linker import Linker
    from clinlinker_spark.training import ranker as training

    config = load_config(args.config, args.set)
    linker = Linker.from_config(dataclasses.replace(config, ranker=RankerConfig()))
    data = training.unseen_by_reranker(linker, training.load_training_mentions(config))
    examples = training.out_of_fold_examples(linker, data)
    names = training.feature_names(linker.reranker is not None)
    scores = training.cross_fitted_scores(examples, names, config.ranker)
    raws, right, _ = training.list_outcomes(examples, scores, np.arange(len(examples.sizes)))
    folds = examples.fold
    result = {
        "config": args.config,
        "mentions": int(len(raws)),
        "oof_acc@1": round(float(right.mean()), 4),
        "ece_raw": round(expected_calibration_error(raws, right), 4),
        "ece_isotonic": round(expected_calibration_error(
            training.cross_fitted_confidence(raws, right, folds), right), 4),
        "ece_platt": round(expected_calibration_error(
            training.cross_fitted_confidence(raws, right, folds, fit=platt_fit), right), 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
