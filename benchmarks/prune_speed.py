"""What pruning buys on the CPU: params, MACs and latency of graphopt.prune against Torch-Pruning at equal ratios.

Models: torchvision ResNet-50, MobileNetV2 and ViT-B/16 (random weights, 1000
classes, 1x3x``--size``x``--size``) and the zoo's diffusers DiT
(the zoo's DiT scaled up: hidden 256, 4 layers, 16x16 latents). Each is pruned at every
``--ratios`` by graphopt (``graphopt.prune``, L2) and by Torch-Pruning
(``MagnitudePruner``, ``GroupMagnitudeImportance(p=2)``, set up as in
prune_coverage.py); a tool that fails leaves its reason in the row. Per row:
parameters, MACs (graphopt's count: the registry's flops / 2 over the captured
graph, elementwise ops included), CPU latency of the eager module and of its ONNX
export (``torch.onnx.export``, ``dynamo=False``) in onnxruntime (``ORT_ENABLE_ALL``),
both with 2 threads, as the median and interquartile range of ``--repeats`` runs
(all variants of one model timed in turns, one run each per round, so drift on a
shared machine falls on all alike), and the time the pruning itself took.

Then a latency target against a MAC target of the same size: ResNet-50 pruned to
``target={"macs": M}`` (M = half the dense MACs), its eager latency T and its
onnxruntime latency R measured, and ResNet-50 pruned to ``target={"latency_ms": T}``
and to ``target={"onnxruntime_latency_ms": R}`` (a latency target also picks the
channel alignment); all models' MACs and latencies are reported. Prints the tables and writes them to
``benchmarks/results/prune_speed.md``.

    python benchmarks/prune_speed.py [--models resnet50,mobilenet_v2,vit_b_16,dit] [--ratios 0.25,0.5,0.75]
        [--repeats 20] [--size 224] [--no-target]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

import graphopt
from graphopt.backends._onnxruntime import inference_session
from graphopt.ir.registry import node_flops
from graphopt.models import KwargsWrapper
from prune_coverage import count_params, onnx_bytes, torch_pruning_prune
from report import Timing, failure_cell, machine, round_robin

RESULTS = Path(__file__).resolve().parent / "results" / "prune_speed.md"
THREADS = 2
WARMUP = 3
MODELS = ("resnet50", "mobilenet_v2", "vit_b_16", "dit")

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def build(name: str, size: int) -> Built:
    if name == "dit":
        return build_dit()
    import torchvision

    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval(), (torch.randn(1, 3, size, size),)


def build_dit() -> Built:
    """A DiT larger than the zoo's (hidden 256, 4 heads, 4 layers, 16x16 latents), small enough for CPU runs."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4,
                                num_layers=4, sample_size=16, patch_size=2, num_embeds_ada_norm=1000)
    model = KwargsWrapper(dit, ("hidden_states", "timestep", "class_labels"), {"return_dict": False})
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.tensor([3]))
    return model.eval(), inputs


# ------------------------------------------------------------------ measuring
Run = Callable[[], object]


def eager_runner(model: nn.Module, inputs: tuple) -> Run:
    def run() -> None:
        with torch.no_grad():
            model(*inputs)
    return run


def ort_runner(model: nn.Module, inputs: tuple) -> Run:
    session = inference_session(onnx_bytes(model, inputs), "all", THREADS, inter_op_threads=1,
                                config={"session.intra_op.allow_spinning": "0"})
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)


def macs(model: nn.Module, inputs: tuple) -> int:
    """graphopt's MAC count (registry flops / 2) of the captured, cleaned-up model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = graphopt.optimize(graphopt.capture(model, inputs), "O1")
    return sum(node_flops(n) for n in graph.nodes) // 2


@dataclass
class Row:
    model: str
    ratio: str
    tool: str
    params: int | None = None
    macs: int | None = None
    eager: Timing | None = None
    onnxruntime: Timing | None = None
    prune_s: float | None = None
    error: str = ""
    runners: dict[str, Run] = field(default_factory=dict, repr=False)  # "eager"/"onnxruntime" -> one run


def prepare(row: Row, model: nn.Module, inputs: tuple) -> Row:
    """Count ``row``'s params and MACs and set up its runners; the first failure ends it with its reason."""
    try:
        row.params = count_params(model)
        row.macs = macs(model, inputs)
        row.runners["eager"] = eager_runner(model, inputs)
        row.runners["onnxruntime"] = ort_runner(model, inputs)
    except Exception as exc:  # noqa: BLE001 - the row says what broke
        row.error = failure_cell(exc)
    return row


def time_round_robin(rows: list[Row], repeats: int) -> None:
    """Time every runner of ``rows`` in turns (``report.round_robin``); fills the rows' timings and drops their runners."""
    runners = [(row, kind, run) for row in rows for kind, run in row.runners.items()]
    for (row, kind, _), timing in zip(runners, round_robin([run for _, _, run in runners], repeats, WARMUP)):
        setattr(row, kind, timing)
    for row in rows:
        row.runners.clear()


def prune_row(name: str, ratio: float, tool: str, dense: nn.Module, inputs: tuple,
              **options) -> tuple[Row, nn.Module | None]:
    row = Row(name, f"{ratio:g}" if ratio else "target", tool)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            if tool == "graphopt":
                pruned = graphopt.prune(copy.deepcopy(dense), inputs, ratio=ratio or 0.5, **options)
            else:
                pruned = torch_pruning_prune(copy.deepcopy(dense), inputs, ratio)
            row.prune_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        row.error = failure_cell(exc)
        return row, None
    return prepare(row, pruned, inputs), pruned


# ------------------------------------------------------------------ the report
def _num(n: int | None, unit: float, suffix: str) -> str:
    return "" if n is None else f"{n / unit:.2f}{suffix}"


def table(rows: list[Row]) -> list[str]:
    dense = {r.model: r for r in rows if r.tool == "dense"}
    lines = ["| model | ratio | tool | params | MACs | ×MACs | eager ms (IQR) | ×eager | onnxruntime ms (IQR) | "
             "×ort | prune s | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense.get(r.model)

        def ratio(get: Callable[[Row], float | None]) -> str:
            a, b = (get(r), get(d)) if d else (None, None)
            return f"{a / b:.2f}" if a and b else ""

        lines.append(
            f"| {r.model} | {r.ratio} | {r.tool} | {_num(r.params, 1e6, 'M')} | {_num(r.macs, 1e6, 'M')} | "
            f"{ratio(lambda x: x.macs)} | {r.eager.cell() if r.eager else ''} | "
            f"{ratio(lambda x: x.eager and x.eager.median_ms)} | {r.onnxruntime.cell() if r.onnxruntime else ''} | "
            f"{ratio(lambda x: x.onnxruntime and x.onnxruntime.median_ms)} | "
            f"{'' if r.prune_s is None else f'{r.prune_s:.1f}'} | {r.error} |")
    return lines


def target_rows(size: int, repeats: int) -> list[Row]:
    """ResNet-50 at half its MACs, then at the latency that model has; the four timed in turns."""
    dense, inputs = build("resnet50", size)
    dense_row = prepare(Row("resnet50", "", "dense"), dense, inputs)
    rows = [dense_row]
    if dense_row.macs is None:
        return rows
    goal = dense_row.macs // 2
    row, pruned = prune_row("resnet50", 0, "graphopt", dense, inputs, target={"macs": goal})
    row.tool = f"graphopt macs={goal / 1e6:.0f}M"
    rows.append(row)
    if pruned is None or row.error:
        return rows
    time_round_robin(rows, repeats)  # the MAC-target model's latencies set the latency targets
    for kind, timing in (("latency_ms", row.eager), ("onnxruntime_latency_ms", row.onnxruntime)):
        latency_row, _ = prune_row("resnet50", 0, "graphopt", dense, inputs, target={kind: timing.median_ms})
        latency_row.tool = f"graphopt {kind}={timing.median_ms:.1f}"
        rows.append(latency_row)
    for r, model in ((dense_row, dense), (row, pruned)):  # time all four together, the first two again
        r.runners.update(eager=eager_runner(model, inputs), onnxruntime=ort_runner(model, inputs))
    time_round_robin(rows, repeats)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--ratios", default="0.25,0.5,0.75", help="pruning ratios (default 0.25,0.5,0.75)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency (default 20)")
    parser.add_argument("--size", type=int, default=224, help="image size of the torchvision models (default 224)")
    parser.add_argument("--no-target", action="store_true", help="skip the latency-vs-MAC target comparison")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (quartiles need two runs)")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(THREADS)
    ratios = [float(r) for r in args.ratios.split(",")]
    from importlib.metadata import version

    header = (f"{machine()}, {THREADS} threads, {args.repeats} runs (median, IQR in brackets); image "
              f"{args.size}x{args.size}; torch {torch.__version__}, torch-pruning {version('torch-pruning')}, "
              f"onnxruntime {ort.__version__}. ×: against the dense model.")
    rows: list[Row] = []
    targets: list[Row] = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        text = "\n".join([header, "", *table(rows)])
        if targets:
            text += "\n\nLatency target against a MAC target (ResNet-50):\n\n" + "\n".join(table(targets))
        RESULTS.write_text(f"# Pruning speed\n\n{text}\n")  # a cut-off run keeps its rows
        return text

    for name in args.models.split(","):
        dense, inputs = build(name, args.size)
        variants = [prepare(Row(name, "", "dense"), dense, inputs)]
        for ratio in ratios:
            for tool in ("graphopt", "torch-pruning"):
                variants.append(prune_row(name, ratio, tool, dense, inputs)[0])
                print(f"{name} {ratio} {tool}: {variants[-1].error or 'pruned'}", file=sys.stderr, flush=True)
        time_round_robin(variants, args.repeats)
        rows += variants
        write()
    if not args.no_target:
        targets = target_rows(args.size, args.repeats)
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
