"""How well the cost models rank lowerings of regions from models they have not seen.

For each model: capture, O2, then three kinds of region: the lowering partitions
(what ``lower_regions`` decides on), each fusion group, and each compute node in no
group. Every region is compiled by each ``--backends`` backend and timed (warm-up,
median; ``cost_models.measured.measure``), the records going to the timing database
with the model's name as their source. Then, leaving one model out at a time, the
learned model is trained on the others and scored on the held-out model's regions:
Spearman rank correlation of predicted against measured seconds, and the share of
regions where the backend predicted fastest is the measured fastest, and what
``lower_regions``' pruning (``prune_factor`` 2) would have done with those predictions:
the share of candidates it skips and the regions whose fastest backend it would have
skipped. The analytical model is scored on the same regions. The ``--train-models`` are timed
too and always in the training set, never scored: more kinds of conv and attention to learn from,
as ``lower_regions``' model has once it is fitted on everything timed here.

Timings on a shared machine are noisy: a sixth of the regions have two backends within 10% of
each other. Give ``--database`` several times to time every region once per file, one file after
the other (independent runs; a file that already holds a timing keeps it): the models are then
trained and scored on the median over the runs, and the table gives how often two runs agree on
the fastest backend, the ceiling for any cost model scored on one run's timings. Prints the table
and writes it to ``benchmarks/results/cost_model_accuracy.md``; the learned model fitted on all
records is saved where ``lower_regions`` loads it.

    python benchmarks/cost_model_accuracy.py [--models a,b] [--backends onnxruntime,torch]
        [--train-models c,d] [--database FILE [--database FILE ...]] [--tuned-malloc]

``--tuned-malloc`` runs it under ``report.TUNED_MALLOC``: with glibc's default thresholds a torch
region's time depends on whether its buffers must be page-faulted in again, and three runs agreed
on the fastest backend for 81-86% of the regions here, against 91% with the tuned allocator.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import torch

import graphopt
from graphopt.backends import load_builtin_backends
from graphopt.backends.base import BACKENDS, random_inputs
from graphopt.backends.lower import worth_lowering
from graphopt.backends.region import Region, extract, partition
from graphopt.cost_models.analytical import AnalyticalCostModel
from graphopt.cost_models.database import TimingDatabase, TimingRecord, device_key
from graphopt.cost_models.learned import LearnedCostModel, ranking_scores
from graphopt.cost_models.measured import measure_in_turns
from graphopt.models import MODEL_CASES
from report import geomean, machine, restart_with_tuned_malloc

RESULTS = Path(__file__).resolve().parent / "results" / "cost_model_accuracy.md"
THREADS = 2
REPEATS = 21
"""Timed calls per region and backend: a sixth of the regions have two backends within 10% of each other,
and the median of 7 calls (interquartile range about a tenth of the time) flipped some of them."""
MODELS = ("torchvision.resnet18", "torchvision.mobilenet_v2", "torchvision.efficientnet_b0", "torchvision.convnext_tiny",
          "torchvision.squeezenet1_0",
          "timm.vit_tiny_patch16_224", "timm.resnet18d", "timm.mobilenetv3_small_050", "transformers.bert",
          "transformers.gpt2", "transformers.t5_encoder", "diffusers.dit")
TRAIN_MODELS = ("torchvision.mobilenet_v3_small", "torchvision.regnet_y_400mf", "torchvision.shufflenet_v2_x0_5",
                "timm.efficientnet_b0", "timm.regnetx_002", "timm.convnext_atto", "transformers.vit",
                "transformers.whisper_encoder")
"""Timed for training only: held out, they would add scores on architectures the twelve already cover."""


def regions_of(graph: graphopt.Graph, supported) -> list[Region]:
    """Partitions, fusion groups and lone compute nodes, each once (by structural hash)."""
    candidates = partition(graph, supported)
    by_name = {n.name: n for n in graph.nodes}
    for group in graph.meta.get("fusion_groups", {}).values():
        members = [by_name[name] for name in group["nodes"]]
        if all(supported(n) for n in members):
            candidates.append(extract(graph, members))
    candidates += [extract(graph, [n]) for n in graph.nodes if "fusion_group" not in n.meta and supported(n)]
    unique: dict[str, Region] = {}
    for r in candidates:
        if worth_lowering(r):
            unique.setdefault(r.hash, r)
    return list(unique.values())


def collect(name: str, backends: list[str], database: TimingDatabase) -> int:
    model, inputs = MODEL_CASES[name].build()
    graph = graphopt.optimize(graphopt.capture(model, inputs), "O2")
    compilers = {b: BACKENDS[b]() for b in backends}
    device = torch.device("cpu")
    count = 0
    for region in regions_of(graph, lambda n: all(c.supports(n) for c in compilers.values())):
        kernels, inputs = {}, random_inputs(region, device)
        for b, backend in compilers.items():
            if database.lookup(region.hash, b, device_key(device)) is not None:
                continue
            try:
                start = time.perf_counter()
                kernel = backend.compile(region, device)
                kernels[b] = kernel, time.perf_counter() - start
                kernel(*inputs)  # fails here rather than in the timing, which has the other backends' kernels too
            except Exception as exc:  # a backend failing on a region is left out of the data
                kernels.pop(b, None)
                print(f"  {name}: {b} failed on region {region.hash}: {type(exc).__name__}", file=sys.stderr)
        if kernels:
            measure_in_turns(region, kernels, inputs, name, database=database, repeats=REPEATS)
            count += len(kernels)
    return count


def analytical_scores(records: list[TimingRecord], regions: dict[str, Region]) -> dict[str, float]:
    model, device = AnalyticalCostModel(), torch.device("cpu")
    pairs = [(r, model.predict(regions[r.region_hash], r.backend, device)) for r in records if r.region_hash in regions]
    pairs = [(r, p) for r, p in pairs if p is not None]
    return ranking_scores([r for r, _ in pairs], [p for _, p in pairs])


def fastest_backends(records, device: str) -> dict[str, str]:
    """The measured fastest backend of each region timed on several."""
    by_region: dict[str, dict[str, float]] = defaultdict(dict)
    for r in records:
        if r.device == device:
            by_region[r.region_hash][r.backend] = r.seconds
    return {h: min(times, key=times.get) for h, times in by_region.items() if len(times) > 1}


def agreement(runs: list[dict[str, str]], regions: set[str]) -> float:
    """The share of ``regions`` where two runs found the same fastest backend, over all pairs of runs
    (NaN with one run)."""
    same = [a[h] == b[h] for a, b in combinations(runs, 2) for h in regions if h in a and h in b]
    return sum(same) / len(same) if same else float("nan")


def median_over_runs(runs: list[list[TimingRecord]]) -> list[TimingRecord]:
    """One record per region, backend and device, its time the median of the runs' times."""
    by_key: dict[tuple[str, str, str], list[TimingRecord]] = defaultdict(list)
    for run in runs:
        for r in run:
            by_key[r.region_hash, r.backend, r.device].append(r)
    return [replace(rs[0], seconds=statistics.median(r.seconds for r in rs)) for rs in by_key.values()]


def percent(share: float) -> str:
    return "" if math.isnan(share) else f"{share:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--train-models", default=",".join(TRAIN_MODELS),
                        help="models timed for training only, never held out ('' for none)")
    parser.add_argument("--backends", default="onnxruntime,torch")
    parser.add_argument("--database", action="append",
                        help="timing database file (default: the cache's); repeat it for independent runs")
    parser.add_argument("--tuned-malloc", action="store_true", help="run under report.TUNED_MALLOC")
    args = parser.parse_args(argv)
    if args.tuned_malloc:
        restart_with_tuned_malloc()
    torch.set_num_threads(THREADS)
    load_builtin_backends()
    names, backends = args.models.split(","), args.backends.split(",")
    train_only = [n for n in args.train_models.split(",") if n and n not in names]
    timed = (*names, *train_only)
    key = device_key(torch.device("cpu"))
    runs = []
    for k, path in enumerate(args.database or [None], 1):
        database = TimingDatabase(path)
        for name in timed:
            start = time.perf_counter()
            print(f"run {k}, {name}: {collect(name, backends, database)} new timings in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        runs.append([r for r in database if r.source in timed and r.backend in backends and r.device == key])
    records = median_over_runs(runs)
    fastest_per_run = [fastest_backends(run, key) for run in runs]
    own = {r.source for r in records}
    for name in [n for n in names if n not in own]:
        print(f"{name}: every region also occurs in a model listed before it; not held out on its own")
    names = [n for n in names if n in own]
    rows = ["| held-out model | regions | learned Spearman | learned picks fastest | analytical Spearman | "
            "analytical picks fastest | pick regret × (learned) | median error × (learned) | pruned ×2 | "
            "fastest pruned | runs agree |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    learned, analytical = defaultdict(list), defaultdict(list)
    for name in names:
        score = LearnedCostModel().evaluate(records, [name])
        model, inputs = MODEL_CASES[name].build()
        graph = graphopt.optimize(graphopt.capture(model, inputs), "O2")
        compilers = [BACKENDS[b]() for b in backends]
        regions = {r.hash: r for r in regions_of(graph, lambda n: all(c.supports(n) for c in compilers))}
        ana = analytical_scores([r for r in records if r.source == name], regions)
        for k in ("spearman", "best_backend_share"):
            learned[k].append(score[k])
            analytical[k].append(ana[k])
        learned["pick_regret"].append(score["pick_regret"])
        learned["hits"].append(score["best_backend_hits"])
        learned["compared"].append(score["heldout_regions_compared"])
        learned["pruned_share"].append(score["pruned_share"])
        learned["fastest_pruned"].append(score["fastest_pruned"])
        learned["agreement"].append(agreement(fastest_per_run, {r.region_hash for r in records if r.source == name}))
        rows.append(f"| {name} | {score['heldout_regions_compared']} | {score['spearman']:.3f} | "
                    f"{score['best_backend_share']:.0%} "
                    f"({score['best_backend_hits']}/{score['heldout_regions_compared']}) | "
                    f"{ana['spearman']:.3f} | {ana['best_backend_share']:.0%} | {score['pick_regret']:.3f} | "
                    f"{score['median_error_factor']:.2f} | {score['pruned_share']:.0%} | {score['fastest_pruned']} | "
                    f"{percent(learned['agreement'][-1])} |")
    mean = statistics.fmean
    hits, compared = sum(learned["hits"]), sum(learned["compared"])
    rows.append(f"| **mean** | | **{mean(learned['spearman']):.3f}** | **{hits / compared:.1%}** of regions "
                f"({hits}/{compared}); {mean(learned['best_backend_share']):.1%} mean of models | "
                f"{mean(analytical['spearman']):.3f} | {mean(analytical['best_backend_share']):.0%} | "
                f"{geomean(learned['pick_regret']):.3f} | | "
                f"{mean(learned['pruned_share']):.0%} | **{sum(learned['fastest_pruned'])}** (total) | "
                f"{percent(mean(learned['agreement']))} |")
    path = LearnedCostModel().fit(records).save()
    text = "\n".join([
        "# Cost model accuracy on held-out models", "",
        f"{machine()}, {THREADS} threads, torch {torch.__version__}; backends: {', '.join(backends)}; "
        f"{len(records)} timings of {len({r.region_hash for r in records})} regions from {len(names)} held-out "
        f"models and {len(train_only)} training-only ones ({', '.join(train_only) or 'none'}). "
        "Leave-one-model-out: the learned model never saw the held-out model's regions.", "", *rows, "",
        "pick regret: the learned model's pick's measured time over the fastest backend's, geometric mean over "
        "the held-out model's regions (mean row: over the models). "
        "pruned ×2: the share of the held-out model's candidates that `lower_regions` would not compile (the "
        "learned model predicts them twice as slow as the fastest); fastest pruned: regions whose measured fastest "
        "backend was among them. runs agree: over pairs of independent timing runs, the share of regions where "
        f"both measured the same backend fastest; {len(runs)} run(s), the models are trained and scored on the median "
        "over them.", "",
        f"The model fitted on all records is saved at {path.name} in the cache folder.", ""])
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
