"""The learned cost model: gradient-boosted trees trained on the timing database.

A row is a record's region features, its device's measured rates and a
one-hot of the backend. The target is not the time itself but its ratio to a
crude roofline of the region (whole-region FLOPs at peak, eager bytes at
bandwidth, a launch per compute node): trees cannot extrapolate, and the
ratio keeps a region twice the size of anything seen in training from being
predicted as fast as the largest one (holding out the two largest sizes of
each model in the tests' data, rank correlation 0.95 against 0.78 for a
target of log seconds). Trees, because the rows are few
(hundreds to thousands of regions), the features heterogeneous counts and
sizes, and the interactions (a conv is compute-bound, an add is not) are
what trees find without feature engineering.
"""
from __future__ import annotations

import math
import pickle
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.backends.base import cache_dir
from graphopt.backends.region import Region

from .base import CostModel
from .database import TimingRecord
from .device_profile import DeviceProfile
from .features import region_features

PROFILE_KEYS = ("peak_flops", "bandwidth", "launch_overhead")


@dataclass(frozen=True)
class LearnedOptions:
    """Gradient-boosting settings: a slow rate for a few hundred to a few thousand noisy rows; depth 6,
    because which backend wins turns on interactions of the backend with size and op mix (leave-one-
    model-out on 858 timings of three CPU backends: picks the fastest 79% at depth 6, 71% at depth 4)."""

    n_estimators: int = 600
    max_depth: int = 6
    learning_rate: float = 0.05
    seed: int = 0


@dataclass
class LearnedCostModel(CostModel):
    """Predicted seconds of a region on a backend seen in training; None before ``fit``, for another
    backend, or when the model was trained on another version of ``region_features``."""

    name = "learned"
    options: LearnedOptions = field(default_factory=LearnedOptions)
    feature_names: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    estimator: Any = None

    def fit(self, records: Iterable[TimingRecord]) -> LearnedCostModel:
        records = list(records)
        if not records:
            raise ValueError("no timing records to train on")
        self.feature_names = list(records[-1].features)
        records = [r for r in records if list(r.features) == self.feature_names]  # older feature sets drop out
        self.backends = sorted({r.backend for r in records})
        rows = [self._row(r.features, r.profile, r.backend) for r in records]
        targets = [math.log(r.seconds / _roofline(r.features, r.profile)) for r in records]
        self.estimator = _regressor(self.options)
        self.estimator.fit(rows, targets)
        return self

    def predict(self, region: Region, backend: str, device: torch.device) -> float | None:
        features = region_features(region)
        if self.estimator is None or backend not in self.backends or list(features) != self.feature_names:
            return None
        return self.predict_seconds([(features, DeviceProfile.for_device(device).numbers(), backend)])[0]

    def predict_seconds(self, rows: Sequence[tuple[Mapping[str, float], Mapping[str, float], str]]) -> list[float]:
        """Seconds for each (region features, device profile numbers, backend) of a fitted model."""
        if not rows:
            return []
        logs = self.estimator.predict([self._row(*row) for row in rows])
        return [math.exp(float(y)) * _roofline(f, p) for y, (f, p, _) in zip(logs, rows)]

    def evaluate(self, records: Iterable[TimingRecord], holdout_sources: Iterable[str]) -> dict[str, float]:
        """Accuracy on unseen models: fit a fresh model (same options) on the records of the other sources,
        predict the held-out ones.

        ``spearman``: rank correlation of predicted and measured seconds over the
        held-out records. ``best_backend_share``: over the held-out regions timed
        on several backends (same device), the share where the backend predicted
        fastest is the measured fastest (NaN if there is none). ``pruned_share`` and
        ``fastest_pruned``: what ``pruning_scores`` says of these predictions.
        """
        holdout = set(holdout_sources)
        records = list(records)
        train = [r for r in records if r.source not in holdout]
        test = [r for r in records if r.source in holdout]
        if not train or len(test) < 2:
            raise ValueError(f"need training records and at least two held-out ones, got {len(train)} and {len(test)}")
        model = LearnedCostModel(self.options).fit(train)
        test = [r for r in test if r.backend in model.backends]
        predicted = model.predict_seconds([(r.features, r.profile, r.backend) for r in test])
        return {**ranking_scores(test, predicted), **pruning_scores(test, predicted),
                "train_records": len(train), "heldout_records": len(test)}

    def save(self, path: Path | str | None = None) -> Path:
        """Pickle the fitted model (default: ``cache_dir("learned")/model.pkl``); load only files you wrote."""
        path = Path(path) if path is not None else _default_path()
        path.write_bytes(pickle.dumps(self))
        return path

    @classmethod
    def load(cls, path: Path | str | None = None) -> LearnedCostModel:
        path = Path(path) if path is not None else _default_path()
        model = pickle.loads(path.read_bytes())
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def _row(self, features: Mapping[str, float], profile: Mapping[str, float], backend: str) -> list[float]:
        return ([features[k] for k in self.feature_names]
                + [math.log(profile[k]) for k in PROFILE_KEYS]
                + [float(backend == b) for b in self.backends])


def ranking_scores(records: Sequence[TimingRecord], predicted: Sequence[float]) -> dict[str, float]:
    """How well ``predicted`` seconds rank the measured ``records``: ``spearman`` correlation,
    ``median_error_factor``, and over the regions timed on several backends (same device):
    ``best_backend_share``, the share where the backend predicted fastest is the measured fastest (NaN
    if none; ``best_backend_hits`` of them), and ``pick_regret``, the geometric mean of the picked
    backend's measured time over the fastest one's (1 when every pick is right): a miss between
    near-equal backends costs little."""
    from scipy.stats import spearmanr

    contested = _contested(records, predicted)
    regrets = [min(times, key=lambda t: t[0])[1] / min(s for _, s in times) for times in contested]
    hits = sum(regret == 1.0 for regret in regrets)
    errors = [abs(math.log(p / r.seconds)) for r, p in zip(records, predicted)]
    return {
        "spearman": float(spearmanr(predicted, [r.seconds for r in records]).statistic),
        "median_error_factor": math.exp(statistics.median(errors)),
        "best_backend_share": hits / len(contested) if contested else float("nan"),
        "best_backend_hits": hits,
        "pick_regret": math.exp(statistics.fmean(map(math.log, regrets))) if regrets else float("nan"),
        "heldout_regions_compared": len(contested),
    }


def pruning_scores(records: Sequence[TimingRecord], predicted: Sequence[float], factor: float = 2.0) -> dict[str, float]:
    """What pruning at ``factor`` (``LowerRegions.prune_factor``) would do with ``predicted``: over the regions
    timed on several backends, the share of their candidates predicted ``factor`` times slower than the
    region's fastest prediction (``pruned_share``), and the number of regions whose measured fastest
    backend is among them (``fastest_pruned``)."""
    contested = _contested(records, predicted)
    pruned = lost = 0
    for times in contested:
        cut = factor * min(p for p, _ in times)
        pruned += sum(p > cut for p, _ in times)
        lost += min(times, key=lambda t: t[1])[0] > cut  # the measured fastest predicted past the cut
    candidates = sum(map(len, contested))
    return {"pruned_share": pruned / candidates if candidates else float("nan"), "fastest_pruned": lost}


def _contested(records: Sequence[TimingRecord], predicted: Sequence[float]) -> list[list[tuple[float, float]]]:
    """(predicted, measured) seconds of each backend, for each region timed on several (same device)."""
    by_region: dict[tuple[str, str], dict[str, tuple[float, float]]] = defaultdict(dict)
    for r, p in zip(records, predicted):
        by_region[r.region_hash, r.device][r.backend] = (p, r.seconds)
    return [list(times.values()) for times in by_region.values() if len(times) > 1]


def _roofline(features: Mapping[str, float], profile: Mapping[str, float]) -> float:
    """The crude scale the trees correct: the region's arithmetic at peak or its eager traffic at
    bandwidth, whichever is slower, plus a launch per compute node."""
    flops, traffic = math.expm1(features["log_flops"]), math.expm1(features["log_eager_bytes"])
    return (max(flops / profile["peak_flops"], traffic / profile["bandwidth"])
            + max(features["eager_kernels"], 1) * profile["launch_overhead"])


def _regressor(options: LearnedOptions) -> Any:
    """xgboost's regressor, or scikit-learn's histogram gradient boosting where xgboost is not installed."""
    try:
        from xgboost import XGBRegressor
    except ImportError:
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(max_iter=options.n_estimators, max_depth=options.max_depth,
                                             learning_rate=options.learning_rate, random_state=options.seed)
    return XGBRegressor(n_estimators=options.n_estimators, max_depth=options.max_depth,
                        learning_rate=options.learning_rate, random_state=options.seed)


def _default_path() -> Path:
    return cache_dir("learned") / "model.pkl"
