"""Which models structural pruning handles: graphopt.prune against Torch-Pruning at ratio 0.5.

Every torchvision classification model (``torchvision.models.list_models``), a
diverse list of small timm models and the zoo's transformers cases (BERT, GPT-2,
Llama, ViT small configs), each with random weights, ``num_classes=10`` and a
small input (64x64 where the model allows it). Each tool prunes its own copy at
``--ratio`` (L2 magnitude, the classifier kept), and is checked the same way:

- the pruned model runs and its output keeps the original shape;
- its parameter count falls;
- it exports to ONNX (``torch.onnx.export``, ``dynamo=False``; for graphopt,
  ``capture(...).to_onnx()`` where the TorchScript exporter fails) and runs in
  onnxruntime with the pruned model's output (max abs diff within 1e-3 of its scale).
  The export goes through a file, so weights past 2 GB go to external data.

Torch-Pruning runs as its README shows: ``MagnitudePruner`` with
``GroupMagnitudeImportance(p=2)``, the layers that write the output's channel
dim ignored (the classifier; the hidden size of transformers); for timm attention
``num_heads`` given and ``head_dim`` updated after pruning, for torchvision ViT the
``nn.MultiheadAttention`` heads given and ``hidden_dim`` updated, as its examples do. graphopt
runs as ``graphopt.prune(model, inputs, ratio)``; it keeps output channels itself.

Models over ``--max-params`` parameters (default: no limit) are skipped with that
reason. A tool that takes over ``--timeout`` seconds on a model fails it with a
TimeoutError, one that takes the process past ``--max-memory-gib`` resident with a
MemoryError. Rows are merged into ``--out`` (``benchmarks/results/prune_coverage.md``)
after every model: a model of this run replaces its old row, the other rows stay,
the summary counts them all, so runs over a few models add up and a cut-off run
keeps its rows. Each model runs in a forked process, so memory one leaves behind
does not count against the next. Models are ordered round-robin over the families (torchvision
smallest first), so ``--limit`` samples all of them.

    python benchmarks/prune_coverage.py [--models torchvision.resnet18,timm.vit_tiny_patch16_224]
        [--limit 15] [--timeout 300] [--max-memory-gib 16] [--ratio 0.5] [--max-params N] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import io
import itertools
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import graphopt
from graphopt.backends._onnxruntime import inference_session
from graphopt.emitters.onnx import save_onnx
from graphopt.models import get_case
from report import failure_cell, machine

RESULTS = Path(__file__).resolve().parent / "results" / "prune_coverage.md"
THREADS = 2
NUM_CLASSES = 10

# timm name -> (image size, create_model kwargs): small models of many families.
TIMM: dict[str, tuple[int, dict]] = {
    "resnet18": (64, {}), "resnet26d": (64, {}), "resnext26ts": (64, {}), "seresnext26d_32x4d": (64, {}),
    "res2net50_26w_4s": (64, {}), "skresnet18": (64, {}), "dla34": (64, {}), "dpn68": (64, {}),
    "densenet121": (64, {}), "cspresnet50": (64, {}), "gernet_s": (64, {}), "nf_resnet26": (64, {}),
    "repvgg_a0": (64, {}), "mobileone_s0": (64, {}), "ese_vovnet19b_slim": (64, {}), "selecsls42b": (64, {}),
    "hrnet_w18_small": (64, {}), "inception_v3": (96, {}), "xception41": (96, {}),
    "mobilenetv2_050": (64, {}), "mobilenetv3_small_050": (64, {}), "mobilenetv3_large_100": (64, {}),
    "mnasnet_small": (64, {}), "fbnetc_100": (64, {}), "lcnet_050": (64, {}), "tinynet_e": (64, {}),
    "efficientnet_b0": (64, {}), "efficientnet_lite0": (64, {}), "tf_efficientnetv2_b0": (64, {}),
    "ghostnet_100": (64, {}), "rexnet_100": (64, {}), "hardcorenas_a": (64, {}), "repghostnet_050": (64, {}),
    "regnetx_002": (64, {}), "regnety_002": (64, {}), "hgnetv2_b0": (64, {}),
    "convnext_atto": (64, {}), "convnextv2_atto": (64, {}), "edgenext_xx_small": (64, {}),
    "poolformer_s12": (64, {}), "efficientformer_l1": (224, {}), "fastvit_t8": (64, {}),
    "mobilevit_xxs": (64, {}), "efficientvit_b0": (64, {}),
    "vit_tiny_patch16_224": (64, {"img_size": 64}), "deit_tiny_patch16_224": (64, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 4}),
    "levit_128s": (224, {}), "mixer_s32_224": (64, {"img_size": 64}), "resmlp_12_224": (64, {"img_size": 64}),
    "pit_ti_224": (224, {}), "cait_xxs24_224": (64, {"img_size": 64}),
    "xcit_nano_12_p16_224": (64, {"img_size": 64}), "coat_lite_tiny": (64, {"img_size": 64}),
    "tiny_vit_5m_224": (224, {}), "eva02_tiny_patch14_224": (56, {"img_size": 56}),
    "crossvit_tiny_240": (240, {}),
}
TRANSFORMERS = ("transformers.bert", "transformers.gpt2", "transformers.llama", "transformers.vit")

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Spec:
    """One model to prune; ``approx_params`` (torchvision's count, 0 if unknown) skips it before building."""

    name: str
    build: Callable[[], Built]
    approx_params: int = 0


# ------------------------------------------------------------------ the models
def _torchvision_specs() -> list[Spec]:
    import torchvision

    def size(arch: str) -> int:
        if arch.startswith("vit_"):
            return 56 if arch.endswith("_14") else 64
        if arch.startswith(("vgg", "alexnet")):
            return 224  # their 7x7 (6x6) adaptive pool has no torch.onnx form on smaller maps
        return {"maxvit_t": 224, "inception_v3": 96}.get(arch, 64)

    def builder(arch: str) -> Callable[[], Built]:
        def build() -> Built:
            kwargs = {"image_size": size(arch)} if arch.startswith("vit_") else {}
            torch.manual_seed(0)
            model = torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES, **kwargs)
            return model.eval(), (torch.randn(1, 3, size(arch), size(arch)),)
        return build

    specs = []
    for arch in torchvision.models.list_models(module=torchvision.models):
        weights = list(torchvision.models.get_model_weights(arch))
        specs.append(Spec(f"torchvision.{arch}", builder(arch), weights[0].meta["num_params"] if weights else 0))
    return sorted(specs, key=lambda s: s.approx_params)


def _timm_specs() -> list[Spec]:
    def builder(arch: str, size: int, kwargs: dict) -> Callable[[], Built]:
        def build() -> Built:
            import timm

            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
            return model.eval(), (torch.randn(1, 3, size, size),)
        return build

    return [Spec(f"timm.{arch}", builder(arch, size, kwargs)) for arch, (size, kwargs) in TIMM.items()]


def _zoo_spec(name: str) -> Spec:
    def build() -> Built:
        model, inputs = get_case(name).build()
        for p in model.parameters():
            p.requires_grad_(True)
        return model, inputs
    return Spec(name, build)


def all_specs() -> list[Spec]:
    """Round-robin over torchvision, timm and transformers, so a prefix samples every family."""
    families = [_torchvision_specs(), _timm_specs(), [_zoo_spec(n) for n in TRANSFORMERS]]
    merged = itertools.chain.from_iterable(itertools.zip_longest(*families))
    return [s for s in merged if s is not None]


def spec_for(name: str) -> Spec:
    """A listed model, any other timm model (at 64x64), or a zoo case (graphopt.models)."""
    known = {s.name: s for s in all_specs()}
    if name in known:
        return known[name]
    if name.startswith("timm."):
        def build() -> Built:
            import timm

            torch.manual_seed(0)
            model = timm.create_model(name.removeprefix("timm."), num_classes=NUM_CLASSES)
            return model.eval(), (torch.randn(1, 3, 64, 64),)
        return Spec(name, build)
    return _zoo_spec(name)


# ------------------------------------------------------------------ shared helpers
def count_params(model: nn.Module) -> int:
    """Distinct parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def first_tensor(out) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
    return out


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Limits:
    """What one tool may spend on one model: wall seconds and resident memory (bytes, None: no cap)."""

    seconds: float
    memory: int | None = None


@contextmanager
def within(limits: Limits) -> Iterator[None]:
    """Raise TimeoutError past the time limit and MemoryError past the memory cap in the main thread.

    Both are checked on a 1 s timer, between Python bytecodes, so a tool that blows up
    fails its own row instead of taking the machine down.
    """
    deadline = time.monotonic() + limits.seconds

    def check(signum, frame):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"over {limits.seconds:.0f} s")
        if limits.memory is not None and resident_bytes() > limits.memory:
            raise MemoryError(f"over {limits.memory / 2**30:.0f} GiB resident")

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, min(1.0, limits.seconds), 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def graphopt_prune(model: nn.Module, inputs: tuple, ratio: float, **kwargs) -> nn.Module:
    return graphopt.prune(model, inputs, ratio=ratio, **kwargs)


def torch_pruning_prune(model: nn.Module, inputs: tuple, ratio: float, importance: str = "l2",
                        target_output_dim: int | None = None) -> nn.Module:
    """Torch-Pruning's MagnitudePruner the way its README sets it up; prunes ``model`` in place."""
    import torch_pruning as tp

    with torch.no_grad():
        out = first_tensor(model(*inputs))
    keep = target_output_dim or (out.shape[-1] if out.dim() in (2, 3) else out.shape[1])
    ignored = [m for m in model.modules()
               if (isinstance(m, nn.Linear) and m.out_features == keep)
               or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == keep)
               or (isinstance(m, nn.Embedding) and out.dim() == 3 and m.embedding_dim == keep)]
    heads = {m.qkv: m.num_heads for m in model.modules()
             if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}
    heads.update({m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)})
    imp = {"l1": tp.importance.GroupMagnitudeImportance(p=1), "l2": tp.importance.GroupMagnitudeImportance(p=2),
           "random": tp.importance.RandomImportance(),
           "taylor": tp.importance.GroupTaylorImportance()}[importance]
    example = inputs[0] if len(inputs) == 1 else inputs
    pruner = tp.pruner.MagnitudePruner(model, example, importance=imp, pruning_ratio=ratio,
                                       ignored_layers=ignored, num_heads=heads)
    pruner.step()
    for m in model.modules():  # timm attention reshapes with head_dim: follow the pruned qkv
        if getattr(m, "qkv", None) in heads and hasattr(m, "head_dim"):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    if isinstance(getattr(model, "conv_proj", None), nn.Conv2d) and hasattr(model, "hidden_dim"):
        model.hidden_dim = model.conv_proj.out_channels  # torchvision ViT reshapes with it (Torch-Pruning's examples)
    return model


def onnx_bytes(model: nn.Module, inputs: tuple) -> bytes:
    buffer = io.BytesIO()
    export_onnx(model, inputs, buffer)
    return buffer.getvalue()


def export_onnx(model: nn.Module, inputs: tuple, to: Path | io.BytesIO) -> None:
    """``torch.onnx.export``; a file gets weights past 2 GB as external data. Grad stays enabled,
    so ``nn.MultiheadAttention`` takes its exportable path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, to if isinstance(to, io.BytesIO) else str(to), dynamo=False,
                          input_names=[f"input_{k}" for k in range(len(inputs))])


def run_onnx(path: Path, inputs: tuple) -> np.ndarray:
    session = inference_session(path, threads=THREADS)
    names = [i.name for i in session.get_inputs()]
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    return session.run(None, feeds)[0]


# ------------------------------------------------------------------ one model
@dataclass
class Side:
    ok: bool = False
    reason: str = ""
    params_after: int | None = None
    seconds: float | None = None
    onnx_via: str = ""

    def cell(self) -> str:
        if self.ok:
            return "ok" + (f" ({self.onnx_via})" if self.onnx_via else "")
        return self.reason


@dataclass
class Row:
    model: str
    params_before: int | None = None
    graphopt: Side = field(default_factory=Side)
    torch_pruning: Side = field(default_factory=Side)


def check(pruned: nn.Module, inputs: tuple, reference_shape: torch.Size, before: int, side: Side,
          graphopt_onnx: bool) -> None:
    """Fill ``side`` from the checks the module docstring lists; raises on the first that fails."""
    with torch.no_grad():
        out = first_tensor(pruned(*inputs))
    if out.shape != reference_shape:
        raise AssertionError(f"output shape {tuple(out.shape)} != {tuple(reference_shape)}")
    side.params_after = count_params(pruned)
    if side.params_after >= before:
        raise AssertionError(f"params did not fall ({side.params_after} >= {before})")
    with tempfile.TemporaryDirectory(prefix="prune_coverage_") as folder:
        path = Path(folder) / "pruned.onnx"
        try:
            export_onnx(pruned, inputs, path)
        except Exception as exc:  # noqa: BLE001 - graphopt's own exporter is the fallback
            if not graphopt_onnx:
                raise
            save_onnx(graphopt.optimize(graphopt.capture(pruned, inputs), "O1"), path)
            side.onnx_via = f"onnx via graphopt; torch.onnx: {type(exc).__name__}"
        got = run_onnx(path, inputs)
    expected = out.numpy()
    diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    if not diff <= 1e-3 * max(1.0, float(np.max(np.abs(expected)))):
        raise AssertionError(f"onnxruntime output differs (max abs diff {diff:.2e})")
    side.ok = True


def run_side(tool: str, model: nn.Module, inputs: tuple, reference_shape: torch.Size, before: int,
             ratio: float, limits: Limits) -> Side:
    side = Side()
    try:
        with within(limits), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            if tool == "graphopt":
                pruned = graphopt_prune(model, inputs, ratio)
            else:
                pruned = torch_pruning_prune(model, inputs, ratio)
            side.seconds = time.perf_counter() - start
            check(pruned, inputs, reference_shape, before, side, graphopt_onnx=tool == "graphopt")
    except Exception as exc:  # noqa: BLE001 - one row per model, whatever broke
        side.ok = False
        side.reason = failure_cell(exc)
    return side


def cover(spec: Spec, ratio: float, limits: Limits, max_params: int | None = None) -> Row:
    row = Row(spec.name)
    skip = f"skipped: over --max-params {max_params}"
    if max_params is not None and spec.approx_params > max_params:
        row.params_before = spec.approx_params
        row.graphopt.reason = row.torch_pruning.reason = skip
        return row
    try:
        with within(limits):
            model, inputs = spec.build()
            model.eval()
            with torch.no_grad():
                reference = first_tensor(model(*inputs))
    except Exception as exc:  # noqa: BLE001
        row.graphopt.reason = row.torch_pruning.reason = "build: " + failure_cell(exc)
        return row
    row.params_before = count_params(model)
    if max_params is not None and row.params_before > max_params:
        row.graphopt.reason = row.torch_pruning.reason = skip
        return row
    spare = copy.deepcopy(model)
    row.graphopt = run_side("graphopt", model, inputs, reference.shape, row.params_before, ratio, limits)
    row.torch_pruning = run_side("torch-pruning", spare, inputs, reference.shape, row.params_before, ratio, limits)
    return row


def cover_in_child(spec: Spec, ratio: float, limits: Limits, max_params: int | None = None) -> Row:
    """``cover`` in a forked process: the memory one model leaves behind goes with it, and a
    crash (killed for memory) fails that model's row instead of the run."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)

    def child() -> None:
        send.send(cover(spec, ratio, limits, max_params))

    process = fork.Process(target=child, daemon=True)
    process.start()
    send.close()
    try:
        return receive.recv()
    except EOFError:
        process.join()
        row = Row(spec.name)
        row.graphopt.reason = row.torch_pruning.reason = f"crashed: exit code {process.exitcode}"
        return row
    finally:
        process.join()


# ------------------------------------------------------------------ the report
DETAIL_HEADER = ("| model | graphopt | params before | graphopt params after | prune s | torch-pruning | "
                 "torch-pruning params after | prune s |")


def _millions(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.3f}M"


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.1f}"


def tables(rows: list[Row]) -> list[str]:
    def passed(side: str) -> int:
        return sum(getattr(r, side).ok for r in rows)

    both = sum(r.graphopt.ok and r.torch_pruning.ok for r in rows)
    only_g = sum(r.graphopt.ok and not r.torch_pruning.ok for r in rows)
    only_t = sum(r.torch_pruning.ok and not r.graphopt.ok for r in rows)
    summary = [
        "| tool | passed | of | only this tool passed |", "|---|---|---|---|",
        f"| graphopt | {passed('graphopt')} | {len(rows)} | {only_g} |",
        f"| torch-pruning | {passed('torch_pruning')} | {len(rows)} | {only_t} |",
        "", f"Both passed: {both}.",
    ]
    detail = [DETAIL_HEADER, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g, t = r.graphopt, r.torch_pruning
        detail.append(
            f"| {r.model} | {g.cell()} | {_millions(r.params_before)} | {_millions(g.params_after)} | "
            f"{_seconds(g.seconds)} | {t.cell()} | {_millions(t.params_after)} | {_seconds(t.seconds)} |")
    return [*summary, "", *detail]


def _side_from(cell: str, params_after: str, seconds: str) -> Side:
    """The inverse of ``Side.cell`` and the two number columns."""
    ok = cell == "ok" or cell.startswith("ok (")
    return Side(ok=ok, reason="" if ok else cell, params_after=_count_from(params_after),
                seconds=float(seconds) if seconds else None, onnx_via=cell[4:-1] if cell.startswith("ok (") else "")


def _count_from(millions: str) -> int | None:
    return round(float(millions.removesuffix("M")) * 1e6) if millions else None


def read_rows(path: Path) -> tuple[float | None, list[Row]]:
    """The ratio and rows a previous run left in ``path`` (none if there is no such file)."""
    if not path.exists():
        return None, []
    lines = path.read_text().splitlines()
    ratio = next((float(m[1]) for line in lines if (m := re.match(r"ratio ([0-9.]+),", line))), None)
    if DETAIL_HEADER not in lines:
        return ratio, []
    rows = []
    for line in lines[lines.index(DETAIL_HEADER) + 2:]:
        if not line.startswith("| "):
            break
        model, g, before, g_after, g_s, t, t_after, t_s = (c.strip() for c in line.strip()[1:-1].split("|"))
        rows.append(Row(model, _count_from(before), _side_from(g, g_after, g_s), _side_from(t, t_after, t_s)))
    return ratio, rows


def merge(old: list[Row], new: list[Row]) -> list[Row]:
    """Old rows in their order with this run's rows in their place; models new to the table at the end."""
    fresh = {r.model: r for r in new}
    return [fresh.pop(r.model, r) for r in old] + list(fresh.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (torchvision.X, timm.X, transformers.X)")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model and tool (default 300)")
    parser.add_argument("--max-memory-gib", type=float, default=16,
                        help="resident memory a tool may reach on one model (default 16)")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio (default 0.5)")
    parser.add_argument("--max-params", type=int, help="skip models with more parameters (default: no limit)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"table to merge into (default {RESULTS})")
    args = parser.parse_args(argv)
    old_ratio, old_rows = read_rows(args.out)
    if old_ratio is not None and old_ratio != args.ratio:
        parser.error(f"{args.out} holds rows at ratio {old_ratio}; pass --ratio {old_ratio} or another --out")
    torch.set_num_threads(THREADS)
    specs = [spec_for(n) for n in args.models.split(",")] if args.models else all_specs()
    specs = specs[: args.limit] if args.limit else specs
    from importlib.metadata import version

    header = (f"ratio {args.ratio}, random weights, {NUM_CLASSES} classes; torch {torch.__version__}, "
              f"torch-pruning {version('torch-pruning')}, onnxruntime {ort.__version__}; {machine()}")
    rows: list[Row] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        limits = Limits(args.timeout, int(args.max_memory_gib * 2**30))
        rows.append(cover_in_child(spec, args.ratio, limits, args.max_params))
        r = rows[-1]
        print(f"{spec.name}: graphopt {r.graphopt.cell()}; torch-pruning {r.torch_pruning.cell()}",
              file=sys.stderr, flush=True)
        text = "\n".join([header, "", *tables(merge(old_rows, rows))])
        partial = args.out.with_name(f".{args.out.name}.tmp")
        partial.write_text(f"# Structural pruning coverage\n\n{text}\n")
        partial.replace(args.out)  # atomic: a run cut off mid-write keeps the old rows
    print("\n".join(tables(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
