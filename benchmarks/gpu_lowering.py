"""Lowering on a GPU: DiT-XL/2 and ViT-L/16 end to end against eager and inductor, and every generated
Triton kernel against the torch ops it replaces.

End to end, for each model (random weights, ``--dtype`` bf16, batch ``--batch`` 16), up to four ways:

- ``eager``: the model as written;
- ``inductor``: ``torch.compile(model)``, the default mode;
- ``graphopt-O3``: ``torch.compile(model, backend="graphopt", options={"level": "O3", ...})``: O2, then
  each region lowered to the candidate the measured cost model picks (``triton``, ``inductor``,
  ``torch``, and ``onnxruntime`` where its CUDA execution provider exists);
- ``graphopt-O3-triton``: candidates ``triton`` and ``torch`` with ``force="triton"``: every region
  Triton can take goes to it (the whole model is usually one region: its fusion groups become
  Triton kernels, the rest, matmuls outside groups and attention included, runs as torch ops).

``--candidates`` replaces graphopt-O3's list. Each region's choice is checked against eager on
random inputs with the dtype's tolerance (``TOLERANCE``: the pass's default 1e-3 would reject
every bf16 kernel); the lowering targets the benchmark's device, named explicitly.

Latency is the median of ``--repeats`` calls under ``torch.no_grad()``, timed round-robin
(``report.round_robin``) with a device synchronization inside each timed call, with the
interquartile range. Speedups are eager ms (or inductor ms) over this way's ms, so higher is
better and inductor's "2.98× eager" reads as 2.98. "compile s" is the first call, compilation
included; "lower s" is the part of it spent in graphopt's ``lower_regions`` pass (partitioning,
compiling and timing every candidate). Every on-disk cache (graphopt's timings, inductor's, Triton's)
starts empty for each model and way unless ``--warm-caches``, so compile times are cold; what stays
in memory does not: a Triton kernel of the same text that an earlier way of the same process
compiled is not compiled again (graphopt-O3 measures Triton before graphopt-O3-triton runs).
Errors are against eager in the same dtype (max |Δ| / max |eager|) and, for scale, against the
model run in higher precision (float32 for bf16, float64 for float32; ‖Δ‖ / ‖ref‖); "ok" compares
the first with ``MODEL_TOLERANCE``. Each kernel's error is against its reference on fresh inputs,
flagged where over ``TOLERANCE``.

Per kernel: each model is captured (``torch.export``) and optimized with O2; for every region
Triton supports, ``TritonBackend().kernels(region, device)`` gives each fusion group that lowers
as a Triton kernel beside its ``reference`` (the torch ops it replaces, same signature). Identical
groups (equal structural hash, e.g. the 28 layers of DiT) are timed once and counted as many times
as they occur. On CUDA both are timed as CUDA-graph replays of ``CALLS`` back-to-back calls
(plain event timing where capture fails), inputs rotated among enough random sets to exceed twice
the L2 cache; then aggregated by kernel kind (elementwise, reduction, epilogue = matmul plus its
pointwise tail) and listed, top ``--top`` by total time.

Prints the tables and writes ``benchmarks/results/gpu_lowering.md`` (``gpu_lowering_tiny.md``
with ``--tiny``).

    python benchmarks/gpu_lowering.py [--models dit,vit] [--batch 16] [--dtype bfloat16] [--repeats 30]
                                      [--ways eager,inductor,graphopt-O3,graphopt-O3-triton] [--skip-kernels]
    TRITON_INTERPRET=1 python benchmarks/gpu_lowering.py --tiny

``--tiny``: DiT with 2 layers, hidden 64, latent 8×8, and a 2-layer ViT on 32×32 images, batch 2,
float32. Without CUDA it runs on the CPU with the kernels in Triton's interpreter, which must be
switched on before the process starts (``TRITON_INTERPRET=1``; Triton reads it when
``triton.language`` is first imported): a correctness run of the whole script, its times say
nothing about performance. Inductor is then the CPU one (C++), ``--ways`` can leave it out. Keep
float32 there: Triton's interpreter multiplies the raw bits of bfloat16 ``tl.dot`` operands
(triton-lang/triton#11584, unsupported upstream), so bf16 epilogue kernels are only checked on a GPU.

On this workplace's GPU machines (torch 2.11, triton 3.6, timm, onnxruntime without a CUDA
provider; no diffusers, no graphopt install, no network): carry ``diffusers`` as a wheel (pure
Python; its requirements huggingface-hub>=1.32, safetensors, regex, requests, filelock, Pillow are
in the image) and put the repo on ``PYTHONPATH`` with ``graphopt/{passes,backends,cost_models}``
linked to the top-level folders, as ``.carry/bench.sh`` does. The ``graphopt`` torch.compile
entry point is then missing unless a dist-info declares it (bench.sh writes one); this script
passes ``graphopt_backend`` itself when the name is not registered, so it runs either way:

    bash .carry/bench.sh python gpu_lowering.py     (with .whl and .carry carried)
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from report import Timing, failure_cell, machine, round_robin

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = ("eager", "inductor", "graphopt-O3", "graphopt-O3-triton")
MODELS = ("dit", "vit")
CALLS = 20
"""Calls per CUDA-graph replay (or per event-timed loop) when timing one kernel."""
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
"""Max |Δ| / max |ref| accepted, per dtype: for ``lower_regions``' check of each region against
eager, and for each kernel against its reference."""
MODEL_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
"""End to end the differences of many layers add up: the "ok" column's bound."""


@dataclass
class Case:
    """A model at one size: how to build it and its inputs."""

    name: str
    label: str
    build: Callable[[torch.device, torch.dtype, int], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]


def _dit(tiny: bool) -> Case:
    # DiT-XL/2 (Peebles & Xie 2023), facebook/DiT-XL-2-256's config: 28 layers, 16 heads × 72 = 1152,
    # patch 2 on a 32×32×4 latent (256 tokens), 1000 classes, learned sigma (8 output channels).
    config = (dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, num_embeds_ada_norm=10) if tiny else
              dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=32, patch_size=2, num_embeds_ada_norm=1000))

    def build(device: torch.device, dtype: torch.dtype, batch: int):
        from diffusers import DiTTransformer2DModel

        from graphopt.models import KwargsWrapper

        torch.manual_seed(0)
        with torch.device(device):
            dit = DiTTransformer2DModel(**config)
        model = KwargsWrapper(dit, ("hidden_states", "timestep", "class_labels"), {"return_dict": False})
        size, classes = config["sample_size"], config["num_embeds_ada_norm"]
        generator = torch.Generator().manual_seed(1)
        inputs = (torch.randn(batch, 4, size, size, generator=generator).to(device, dtype),
                  torch.randint(0, 1000, (batch,), generator=generator).to(device),
                  torch.randint(0, classes, (batch,), generator=generator).to(device))
        return _finish(model, device, dtype), inputs

    label = ("DiT 2 layers, hidden 64, latent 8×8" if tiny else "DiT-XL/2, latent 32×32") + " (diffusers)"
    return Case("dit", label, build)


def _vit(tiny: bool) -> Case:
    arch, kwargs, image = (("vit_tiny_patch16_224", {"img_size": 32, "depth": 2, "num_classes": 10}, 32) if tiny
                           else ("vit_large_patch16_224", {}, 224))

    def build(device: torch.device, dtype: torch.dtype, batch: int):
        import timm

        torch.manual_seed(0)
        with torch.device(device):
            model = timm.create_model(arch, pretrained=False, **kwargs)
        generator = torch.Generator().manual_seed(1)
        inputs = (torch.randn(batch, 3, image, image, generator=generator).to(device, dtype),)
        return _finish(model, device, dtype), inputs

    label = ("ViT-Ti/16, 2 layers, 32×32" if tiny else "ViT-L/16, 224×224") + " (timm)"
    return Case("vit", label, build)


def _finish(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(device, dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


CASES = {"dit": _dit, "vit": _vit}


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(run: Callable[..., Any], inputs: tuple, device: torch.device) -> Callable[[], None]:
    """One timed call: the run, then a wait for the device, so the clock reads finished work."""
    def call() -> None:
        run(*inputs)
        synchronize(device)

    return call


def input_sets(region: Any, device: torch.device, seed: int) -> list[list[torch.Tensor]]:
    """Random input sets for a kernel: on CUDA enough to exceed twice the L2 cache (at most 8), so
    back-to-back calls read memory, not cache; one on the CPU."""
    from graphopt.backends.base import random_inputs

    first = random_inputs(region, device, seed)
    if device.type != "cuda":
        return [first]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    size = max(sum(t.numel() * t.element_size() for t in first), 1)
    return [first] + [random_inputs(region, device, seed + k) for k in range(1, min(8, math.ceil(2 * l2 / size)))]


def kernel_times(runs: Sequence[Callable[..., Any]], sets: list[list[torch.Tensor]], device: torch.device,
                 repeats: int) -> tuple[list[Timing], str]:
    """Per-call milliseconds of each of ``runs`` on rotating ``sets``, measured in turns; and how.

    CUDA: each run's ``CALLS`` calls are captured in one CUDA graph and the replays timed with
    events (launch gaps gone), or, where capture fails, the calls themselves between events.
    CPU: each call on the host clock.
    """
    with torch.no_grad():
        if device.type != "cuda":
            for run in runs:  # warm-up: loading, allocator
                run(*sets[0])
            return round_robin([functools.partial(run, *sets[0]) for run in runs], repeats, 0), "host clock"
        calls = [functools.partial(_loop, run, sets) for run in runs]
        # Warm up (loading, autotuning, cuBLAS handles, allocator) on the stream that captures, as torch advises.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for call in calls:
                call()
        torch.cuda.current_stream(device).wait_stream(stream)
        synchronize(device)
        method = "CUDA graph"
        replays: list[Callable[[], None]] = []
        graphs = []
        try:
            for call in calls:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    call()
                graphs.append(graph)
                replays.append(graph.replay)
        except Exception:  # a run that cannot be captured: time the launches as they come
            torch.cuda.synchronize(device)
            replays, method = calls, "events"
        times: list[list[float]] = [[] for _ in runs]
        for replay in replays:
            replay()
        for _ in range(repeats):
            for replay, ts in zip(replays, times):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                replay()
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end) / CALLS)
        del graphs
        return [Timing.of(ts) for ts in times], method


def _loop(run: Callable[..., Any], sets: list[list[torch.Tensor]]) -> None:
    for k in range(CALLS):
        run(*sets[k % len(sets)])


# ------------------------------------------------------------------------------------- end to end
@dataclass
class Row:
    model: str
    way: str
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    compile_s: float | None = None
    lower_s: float | None = None
    error_vs_eager: float | None = None
    error_vs_precise: float | None = None
    ok: bool | None = None
    chosen: str = ""
    recompiled: bool = False
    error: str = ""


def candidates(device: torch.device) -> tuple[str, ...]:
    """triton, inductor, torch; and onnxruntime where its CUDA provider exists."""
    names = ["triton", "inductor", "torch"]
    if device.type == "cuda":
        try:
            import onnxruntime

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                names.insert(0, "onnxruntime")
        except ImportError:
            pass
    return tuple(names)


def graphopt_backend_ref() -> str | Callable[..., Any]:
    """``"graphopt"`` where the entry point is registered (an installed graphopt), else the function."""
    if "graphopt" in torch.compiler.list_backends(exclude_tags=()):
        return "graphopt"
    from graphopt.compile_backend import graphopt_backend

    return graphopt_backend


def prepare(way: str, model: torch.nn.Module, lowering: dict[str, Any], report: Path) -> Callable[..., Any]:
    if way == "eager":
        return model
    if way == "inductor":
        return torch.compile(model)
    # Forced, the other candidates would only be compiled and timed for nothing: torch stays as the fallback.
    options = dict(lowering, backends=("triton", "torch"), force="triton") if way == "graphopt-O3-triton" else lowering
    return torch.compile(model, backend=graphopt_backend_ref(), options={
        "level": "O3", "pass_options": {"lower_regions": options}, "fallback": False, "report": str(report)})


def norm_error(reference: torch.Tensor, got: torch.Tensor) -> float:
    reference, got = reference.double().cpu(), got.double().cpu()
    return ((reference - got).norm() / reference.norm().clamp_min(1e-30)).item()


def end_to_end(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    from graphopt.testing import flatten_outputs, max_rel_error

    model, inputs = case.build(device, dtype, args.batch)
    precise_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    with torch.no_grad():
        precise = copy.deepcopy(model).to(precise_dtype)
        reference_precise = flatten_outputs(precise(*[x.to(precise_dtype) if x.is_floating_point() else x
                                                      for x in inputs]))
        del precise
        reference = flatten_outputs(model(*inputs))
    lowering = {"backends": args.candidates or candidates(device), "device": str(device), "source": case.name,
                "tolerance": TOLERANCE[dtype], **({"repeats": 2} if args.tiny else {})}
    rows, live = [], []
    torch.compiler.reset()
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for way in args.ways:
            row = Row(case.name, way)
            rows.append(row)
            report = Path(tmp) / f"{way}.json"
            if args.cold_root is not None:
                cold_caches(Path(args.cold_root, case.name, way))
            try:
                synchronize(device)
                start = time.perf_counter()
                run = prepare(way, model, lowering, report)
                got = flatten_outputs(run(*inputs))
                synchronize(device)
                if way != "eager":
                    row.compile_s = time.perf_counter() - start
                row.error_vs_eager = max_rel_error(reference[:len(got)], got)
                row.error_vs_precise = max(norm_error(r, g) for r, g in zip(reference_precise, got))
                row.ok = row.error_vs_eager <= MODEL_TOLERANCE[dtype]
                if report.exists():
                    graphs = json.loads(report.read_text())["graphs"]
                    chosen = Counter(d["chosen"] or "eager" for g in graphs for d in g.get("lowering", []))
                    row.chosen = ", ".join(f"{b}×{k}" for b, k in chosen.most_common())
                    row.lower_s = sum(p["seconds"] for g in graphs for p in g.get("passes", [])
                                      if p["name"] == "lower_regions")
                live.append((row, run, report, len(json.loads(report.read_text())["graphs"])
                             if report.exists() else 0))
            except Exception as exc:  # a way that fails on a model is a result, not a crash
                row.error = failure_cell(exc)
            print(f"  {case.name} {way}: " + (f"failed: {row.error}" if row.error else
                                               f"first call {row.compile_s or 0:.1f} s, "
                                               f"error {row.error_vs_eager:.1e}, {row.chosen}"), flush=True)
        timings = round_robin([synced(run, inputs, device) for _, run, _, _ in live], args.repeats, args.warmup)
        for (row, _, report, graphs), t in zip(live, timings):
            row.q1_ms, row.median_ms, row.q3_ms = t.q1_ms, t.median_ms, t.q3_ms
            row.recompiled = report.exists() and len(json.loads(report.read_text())["graphs"]) != graphs
    return rows


def speedup(row: Row, rows: list[Row], over: str) -> float | None:
    base = next((r for r in rows if r.model == row.model and r.way == over), None)
    if row.error or base is None or base.error or base.median_ms is None or row.median_ms is None:
        return None
    return base.median_ms / row.median_ms


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def end_to_end_table(rows: list[Row]) -> list[str]:
    lines = ["| model | way | ms (median) | IQR ms | × eager | × inductor | compile s | lower s | "
             "max rel err vs eager | rel err vs precise | ok | regions → backend |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.way} | failed: {r.error} | | | | | | | | | |")
            continue
        note = " (recompiled while timed)" if r.recompiled else ""
        lines.append(f"| {r.model} | {r.way} | {r.median_ms:.3f} | {r.q3_ms - r.q1_ms:.3f} | "
                     f"{_num(speedup(r, rows, 'eager'), '.2f')} | {_num(speedup(r, rows, 'inductor'), '.2f')} | "
                     f"{_num(r.compile_s, '.1f')} | {_num(r.lower_s, '.1f')} | {r.error_vs_eager:.1e} | "
                     f"{r.error_vs_precise:.1e} | {'yes' if r.ok else 'NO'} | {r.chosen}{note} |")
    return lines


def goal_table(rows: list[Row], goal: float) -> list[str]:
    lines = [f"| model | inductor × eager | graphopt-O3 × inductor | graphopt-O3-triton × inductor | "
             f"goal ≥ {goal:.2f}× inductor |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(r.model for r in rows):
        mine = {r.way: r for r in rows if r.model == model}
        ratios = {way: speedup(mine[way], rows, "inductor") if way in mine else None
                  for way in ("graphopt-O3", "graphopt-O3-triton")}
        best = max((x for x in ratios.values() if x is not None), default=None)
        met = "" if best is None else ("met" if best >= goal else "not met")
        inductor = speedup(mine["inductor"], rows, "eager") if "inductor" in mine else None
        lines.append(f"| {model} | {_num(inductor, '.2f')} | {_num(ratios['graphopt-O3'], '.2f')} | "
                     f"{_num(ratios['graphopt-O3-triton'], '.2f')} | {met} |")
    return lines


# ------------------------------------------------------------------------------------- per kernel
@dataclass
class KernelRow:
    model: str
    name: str
    kind: str
    shape: str
    count: int
    triton: Timing | None = None
    torch: Timing | None = None
    max_rel_error: float | None = None
    method: str = ""
    tolerance: float = 0.0
    error: str = ""

    @property
    def speedup(self) -> float | None:
        return None if self.triton is None or self.torch is None else self.torch.median_ms / self.triton.median_ms

    def total(self, which: str) -> float:
        timing = getattr(self, which)
        return 0.0 if timing is None else timing.median_ms * self.count


@dataclass
class Coverage:
    model: str
    groups: int = 0
    lowered: int = 0
    capture_s: float = 0.0
    kinds: Counter = field(default_factory=Counter)
    left_out: Counter = field(default_factory=Counter)
    """Why groups stay in torch (``TritonBackend.kernels`` logs each), with how often."""


class _LeftOut(logging.Handler):
    """Collects the reasons ``TritonBackend.kernels`` logs for the fusion groups it leaves to torch."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if "stays in torch" in record.msg and isinstance(record.args, tuple) and record.args:
            self.reasons[str(record.args[-1])] += 1


def per_kernel(case: Case, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype) -> tuple[list[KernelRow], Coverage]:
    """Every Triton kernel of the model's O2 graph against its reference, identical groups timed once."""
    import graphopt
    from graphopt.backends.base import random_inputs
    from graphopt.backends.region import partition
    from graphopt.backends.triton import TritonBackend
    from graphopt.testing import max_rel_error

    coverage = Coverage(case.name)
    model, inputs = case.build(device, dtype, args.batch)
    start = time.perf_counter()
    with torch.no_grad():
        graph = graphopt.optimize(graphopt.capture(model, inputs), "O2")
    coverage.capture_s = time.perf_counter() - start
    del model
    backend = TritonBackend()
    unique: dict[str, Any] = {}
    counts: Counter = Counter()
    left_out = _LeftOut()
    logger = logging.getLogger("graphopt.backends.triton")
    level = logger.level
    logger.addHandler(left_out)
    logger.setLevel(logging.DEBUG)
    try:
        for region in partition(graph, backend.supports):
            coverage.groups += len({n.meta["fusion_group"] for n in region.graph.nodes if "fusion_group" in n.meta})
            for k in backend.kernels(region, device):
                coverage.lowered += 1
                coverage.kinds[k.source.kind] += 1
                counts[k.region.hash] += 1
                unique.setdefault(k.region.hash, k)
    finally:
        logger.removeHandler(left_out)
        logger.setLevel(level)
    coverage.left_out = left_out.reasons
    rows = []
    for n, (key, k) in enumerate(unique.items()):
        shape = ", ".join("×".join(map(str, v.type.shape)) for v in k.region.graph.outputs)
        row = KernelRow(case.name, f"{k.source.name} #{key[:6]}", k.source.kind, shape, counts[key],
                        tolerance=TOLERANCE[dtype])
        rows.append(row)
        try:
            with torch.no_grad():
                check = random_inputs(k.region, device, seed=1000)
                row.max_rel_error = max_rel_error(k.reference(*check), k.kernel(*check))
                del check
            (row.triton, row.torch), row.method = kernel_times([k.kernel, k.reference],
                                                               input_sets(k.region, device, seed=n * 16),
                                                               device, args.kernel_repeats)
        except Exception as exc:
            row.error = failure_cell(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, coverage


def kind_table(rows: list[KernelRow], coverage: list[Coverage]) -> list[str]:
    lines = ["| model | kind | kernels (distinct) | launches per forward | Triton ms per forward | "
             "torch ms per forward | speedup | worst rel err |", "|---|---|---|---|---|---|---|---|"]
    for cov in coverage:
        mine = [r for r in rows if r.model == cov.model and not r.error]
        for kind in (*sorted({r.kind for r in mine}), "all"):
            sel = [r for r in mine if kind in ("all", r.kind)]
            triton, reference = sum(r.total("triton") for r in sel), sum(r.total("torch") for r in sel)
            worst = max((r.max_rel_error for r in sel if r.max_rel_error is not None), default=None)
            lines.append(f"| {cov.model} | {kind} | {len(sel)} | {sum(r.count for r in sel)} | {triton:.3f} | "
                         f"{reference:.3f} | {_num(reference / triton if triton else None, '.2f')} | "
                         f"{_num(worst, '.1e')} |")
    return lines


def coverage_table(coverage: list[Coverage]) -> list[str]:
    lines = ["| model | fusion groups | lowered to Triton | by kind | left to torch, why | capture + O2 s |",
             "|---|---|---|---|---|---|"]
    for c in coverage:
        kinds = ", ".join(f"{k} {n}" for k, n in c.kinds.most_common())
        why = "; ".join(f"{n}× {reason}" for reason, n in c.left_out.most_common()).replace("|", "/")
        lines.append(f"| {c.model} | {c.groups} | {c.lowered} | {kinds} | {why} | {c.capture_s:.1f} |")
    return lines


def top_table(rows: list[KernelRow], top: int) -> list[str]:
    lines = ["| model | kernel | kind | output shape | count | Triton µs | torch µs | speedup | "
             "Triton ms total | torch ms total | rel err | timed by |", "|---" * 12 + "|"]
    shown = sorted(rows, key=lambda r: -r.total("triton"))[:top]
    for r in shown:
        if r.error:
            lines.append(f"| {r.model} | {r.name} | {r.kind} | {r.shape} | {r.count} | failed: {r.error} "
                         f"| | | | | | |")
            continue
        lines.append(f"| {r.model} | `{r.name}` | {r.kind} | {r.shape} | {r.count} | "
                     f"{r.triton.median_ms * 1e3:.1f} | {r.torch.median_ms * 1e3:.1f} | {r.speedup:.2f} | "
                     f"{r.total('triton'):.3f} | {r.total('torch'):.3f} | {_num(r.max_rel_error, '.1e')}"
                     f"{' OVER' if (r.max_rel_error or 0) > r.tolerance else ''} | {r.method} |")
    failed = [r for r in rows if r.error and r not in shown]
    lines += [f"| {r.model} | {r.name} | {r.kind} | {r.shape} | {r.count} | failed: {r.error} | | | | | | |"
              for r in failed]
    return lines


# -------------------------------------------------------------------------------------------- main
def environment(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda"
             else f"{machine()}, {torch.get_num_threads()} threads, Triton interpreter")
    return (f"{where}; torch {torch.__version__}, triton {version('triton')}, diffusers {version('diffusers')}, "
            f"timm {version('timm')}; {str(dtype).removeprefix('torch.')}, batch {args.batch}; "
            f"graphopt-O3 candidates: {', '.join(args.candidates or candidates(device))} (forced: triton, torch); "
            f"{args.repeats} round-robin repeats end to end, {args.kernel_repeats} per kernel; "
            f"caches {'warm' if args.warm_caches else 'cold'}.")


def cold_caches(root: Path) -> None:
    """Point graphopt's, inductor's and Triton's caches at empty folders (read when first used)."""
    for variable, sub in (("GRAPHOPT_CACHE_DIR", "graphopt"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                          ("TRITON_CACHE_DIR", "triton")):
        os.environ[variable] = str(root / sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models in float32: a correctness run "
                        "(on the CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--batch", type=int, default=None, help="default 16 (2 with --tiny)")
    parser.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="end-to-end calls per way (default 30; 3 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per way first (default 5; 1 tiny)")
    parser.add_argument("--kernel-repeats", type=int, default=None, help="default 30 (3 with --tiny)")
    parser.add_argument("--candidates", default=None, help="graphopt-O3's candidate backends, comma-separated "
                        "(default: triton,inductor,torch, and onnxruntime first where it has a CUDA provider)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--goal", type=float, default=1.15, help="the speedup over inductor aimed at")
    parser.add_argument("--skip-kernels", action="store_true", help="only the end-to-end comparison")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the per-kernel comparison")
    parser.add_argument("--warm-caches", action="store_true", help="keep graphopt's, inductor's and Triton's "
                        "caches (default: empty ones for each model and way, so compile times are cold)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 16)
    args.repeats = args.repeats or (3 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.kernel_repeats = args.kernel_repeats or (3 if args.tiny else 30)
    args.ways = [w for w in args.ways.split(",") if w]
    args.candidates = tuple(args.candidates.split(",")) if args.candidates else None
    unknown = sorted({*args.ways} - set(WAYS)) + sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown way or model: {', '.join(unknown)}")
    if "eager" not in args.ways:
        args.ways.insert(0, "eager")
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))

    from graphopt.backends import _triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("gpu_lowering: no CUDA device here; on a CPU only `TRITON_INTERPRET=1 ... --tiny` runs",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and not _triton.interpreting():
        print("gpu_lowering: no CUDA device, so the Triton kernels must run in the interpreter: "
              "start the process with TRITON_INTERPRET=1 set", file=sys.stderr)
        return 2
    if (reason := _triton.unavailable(device)) is not None:
        print(f"gpu_lowering: Triton cannot run kernels here: {reason}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        if dtype == torch.bfloat16:
            print("gpu_lowering: warning: Triton's interpreter gets bfloat16 tl.dot wrong "
                  "(triton-lang/triton#11584): expect huge errors from the epilogue kernels", file=sys.stderr)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter computes masked-off lanes
    warnings.filterwarnings("ignore", category=FutureWarning)
    scratch = None if args.warm_caches else tempfile.TemporaryDirectory(prefix="gpu_lowering-")
    args.cold_root = None if scratch is None else scratch.name
    if scratch is not None:
        cold_caches(Path(scratch.name, "kernels"))

    started = time.perf_counter()
    cases = [CASES[name](args.tiny) for name in args.models.split(",")]
    e2e: list[Row] = []
    kernels: list[KernelRow] = []
    coverage: list[Coverage] = []
    for case in cases:
        if not args.skip_end_to_end:
            print(f"{case.label}: end to end", flush=True)
            e2e += end_to_end(case, args, device, dtype)
            print("\n".join(end_to_end_table([r for r in e2e if r.model == case.name])[2:]), flush=True)
        if not args.skip_kernels:
            print(f"{case.label}: per kernel", flush=True)
            if args.cold_root is not None:
                cold_caches(Path(args.cold_root, case.name, "kernels"))
            try:
                rows, cov = per_kernel(case, args, device, dtype)
            except Exception as exc:
                print(f"  per-kernel comparison failed: {failure_cell(exc)}", flush=True)
                rows, cov = [], Coverage(case.name)
            kernels += rows
            coverage.append(cov)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - started

    title = "# Lowering on a GPU: DiT-XL/2 and ViT-L/16 against eager and inductor, Triton kernels against torch"
    header = [title, ""]
    if args.tiny:
        header = ["# Lowering, tiny models: a correctness run of benchmarks/gpu_lowering.py", "",
                  "**Not performance.** " + ("The Triton kernels ran in Triton's CPU interpreter "
                                             "(`TRITON_INTERPRET=1`) and " if device.type == "cpu" else "")
                  + "the models are tiny stand-ins (`--tiny`); the times below only show that every path ran. "
                    "The numbers that count are in `gpu_lowering.md`, from a GPU.", ""]
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header += [environment(device, dtype, args), "",
               f"Whole run: {elapsed:.0f} s. `python benchmarks/gpu_lowering.py {command}`", ""]
    sections = []
    if e2e:
        sections += ["## End to end", "", "Speedups are eager (or inductor) ms over this way's ms: higher is better.",
                     "", *goal_table(e2e, args.goal), "", *end_to_end_table(e2e), ""]
    if coverage:
        sections += ["## Triton kernels against the torch ops they replace", "",
                     "Per forward: each distinct kernel's median time times how often it occurs in the model.", "",
                     *coverage_table(coverage), "", *kind_table(kernels, coverage), "",
                     f"Top {args.top} by Triton time per forward:", "", *top_table(kernels, args.top), ""]
    text = "\n".join([*header, *sections])
    print(text)
    out = RESULTS / ("gpu_lowering_tiny.md" if args.tiny else "gpu_lowering.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
