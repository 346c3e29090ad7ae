"""The ``graphopt`` command: optimize, prune, inspect and compare ONNX models; list passes; run the demo.

Exit codes: 0 success, 2 user error (one ``graphopt: error: ...`` line on stderr,
no output file written), 3 ``--check`` found outputs further apart than ``--tol``
(``prune``: outputs that changed shape or are not finite; no output file written). Any other failure is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GraphoptError, InvalidOptionError

if TYPE_CHECKING:
    import numpy as np
    import onnx

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 3


class CheckFailed(Exception):
    """``--check`` found the optimized model's outputs too far from the original's."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.command(args)
    except GraphoptError as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except CheckFailed as e:
        print(f"graphopt: check failed: {e}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except BrokenPipeError:  # the reader (e.g. `| head`) went away: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    from .emitters.onnx import TARGETS

    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    opt = commands.add_parser("optimize", help="optimize an ONNX model and print what changed")
    opt.add_argument("input", metavar="IN.onnx")
    opt.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    opt.add_argument("--level", default="O2", help="pipeline to run (default: O2; see `graphopt passes`)")
    opt.add_argument("--passes", default="", metavar="A,B", help="extra passes to run after the pipeline")
    opt.add_argument("--target", default="onnx", choices=TARGETS,
                     help="onnx: standard ops only (default); onnxruntime: also its fused contrib ops; "
                          "onnxruntime-cpu: also its NCHWc conv layout, for CPUs like this one only")
    opt.add_argument("--opset", type=int, metavar="N",
                     help="opset to write (default: the input's); 23 and up lowers attention to Attention")
    opt.add_argument("--check", type=int, default=0, metavar="N",
                     help="run N random inputs through onnxruntime on both models and compare the outputs")
    opt.add_argument("--tol", type=float, default=1e-4,
                     help="largest relative difference --check accepts (default: 1e-4)")
    opt.add_argument("--bench", action="store_true", help="time both models with onnxruntime")
    opt.add_argument("--repeat", type=int, default=20, help="timed runs per model for --bench (default: 20)")
    opt.add_argument("--report", metavar="R.json", help="write the pass report (JSON) here")
    opt.set_defaults(command=cmd_optimize)

    prune = commands.add_parser("prune", help="remove channels (structured pruning) and print the savings")
    prune.add_argument("input", metavar="IN.onnx")
    prune.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    prune.add_argument("--ratio", type=float, metavar="R",
                       help="share of each group's channels to remove, in [0, 1) (default: 0.5)")
    prune.add_argument("--importance", default="l2", metavar="l1|l2|random",
                       help="how channels are ranked (default: l2 magnitude)")
    prune.add_argument("--ranking", default="layer", metavar="layer|global",
                       help="remove the ratio from every group (default) or from all channels together")
    prune.add_argument("--round-to", type=int, metavar="N", help="keep channel counts multiples of N")
    prune.add_argument("--ignore", default="", metavar="A,B", help="layers (parameter, node or module names) to keep")
    prune.add_argument("--plan", metavar="PLAN.json", help="apply this saved plan instead of ranking channels")
    prune.add_argument("--plan-out", metavar="PLAN.json", help="write the plan applied here")
    prune.add_argument("--check", type=int, default=0, metavar="N",
                       help="run N random inputs through onnxruntime on both models; outputs must keep their shapes")
    prune.set_defaults(command=cmd_prune)

    passes = commands.add_parser("passes", help="list the registered passes and pipelines")
    passes.set_defaults(command=cmd_passes)

    inspect = commands.add_parser("inspect", help="summarize an ONNX model and its IR")
    inspect.add_argument("input", metavar="IN.onnx")
    inspect.set_defaults(command=cmd_inspect)

    explain = commands.add_parser("explain", help="show which backend each region of a model would run on, and why")
    explain.add_argument("input", metavar="IN.onnx")
    explain.add_argument("--level", default="O2", help="pipeline to run before lowering (default: O2)")
    explain.add_argument("--backends", metavar="A,B", help="candidate backends (default: all built in)")
    explain.add_argument("--forbid", default="", metavar="A,B", help="backends never to choose")
    explain.add_argument("--force", metavar="NAME", help="choose this backend wherever it supports a region")
    explain.add_argument("--cost-model", default="measured", choices=("measured", "analytical", "learned"),
                         help="what decides (default: measured; predictions are shown beside it)")
    explain.add_argument("--expected-calls", type=int, default=1000, metavar="N",
                         help="calls that compile time is spread over (default: 1000)")
    explain.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                         help="value of a symbolic input dimension (default: 1 for each)")
    explain.add_argument("--json", metavar="OUT.json", help="also write the decisions as JSON here")
    explain.set_defaults(command=cmd_explain)

    demo = commands.add_parser("demo", help="optimize a ResNet, a ViT and a DiT and compare with eager")
    demo.add_argument("--quick", action="store_true", help="only the first model, fewer timing runs")
    demo.set_defaults(command=cmd_demo)
    return parser


# -------------------------------------------------------------------- optimize
def cmd_optimize(args: argparse.Namespace) -> int:
    from .api import load_onnx, optimize

    src = existing_file(args.input)
    dst = writable_path(args.output, src, "-o")
    report_path = writable_path(args.report, src, "--report") if args.report else None
    if report_path == dst:
        raise GraphoptError(f"--report and -o name the same file {dst}; give the report its own path")
    passes = split_names(args.passes)
    check_pipeline(args.level, passes)
    if args.check < 0 or args.repeat < 1:
        raise GraphoptError("--check needs N >= 0 and --repeat N >= 1")

    original = read_onnx(src)
    graph = optimize(load_onnx(original), level=args.level, passes=passes)
    optimized = graph.to_onnx(opset=emit_opset(graph, args.opset), target=args.target)
    print(op_table(original, optimized))
    if args.check:
        print(check_outputs(original, optimized, args.check, args.tol))
    save_model(optimized, dst)
    print(f"wrote {dst}")
    if report_path is not None:
        write_atomically(report_path, graph.meta["report"].to_json().encode())
        print(f"wrote {report_path}")
    if args.bench:
        print(bench_table(original, optimized, args.repeat))
    return 0


def existing_file(name: str) -> Path:
    path = Path(name).resolve()
    if not path.exists():
        raise GraphoptError(f"input file {name} does not exist; check the path")
    if not path.is_file():
        raise GraphoptError(f"input {name} is not a file; pass the path of an .onnx model")
    return path


def writable_path(name: str, src: Path, flag: str) -> Path:
    """Resolve an output path, refusing the input file and missing directories."""
    path = Path(name).resolve()
    if path == src:
        raise GraphoptError(f"{flag} {name} is the input file; write to a different path")
    if path.is_dir():
        raise GraphoptError(f"{flag} {name} is a directory; give a file name")
    if not path.parent.is_dir():
        raise GraphoptError(f"{flag}: directory {path.parent} does not exist; create it first")
    return path


def emit_opset(graph, opset: int | None) -> int | None:
    """The opset to write, refused where graphopt cannot write it faithfully."""
    from .emitters.onnx import MIN_OPSET

    if opset is None:
        return None
    if opset < MIN_OPSET:
        raise GraphoptError(f"--opset {opset} is too old: graphopt writes opset {MIN_OPSET} and up")
    loaded = graph.meta.get("onnx", {}).get("opset_imports", {}).get("", opset)
    kept = sorted({n.attrs["op_type"] for n in graph.nodes if n.op == "onnx.opaque"})
    if opset != loaded and kept:
        raise GraphoptError(f"--opset {opset}: the model keeps ONNX ops graphopt writes verbatim ({', '.join(kept)}), "
                            f"which it cannot move off opset {loaded}; convert the input with "
                            f"onnx.version_converter first, or leave out --opset")
    return opset


def check_pipeline(level: str, passes: Sequence[str]) -> None:
    from .pass_manager import get_pass, pipeline

    try:
        pipeline(level)
        for name in passes:
            get_pass(name)
    except KeyError as e:
        raise GraphoptError(f"{e.args[0]} (see `graphopt passes`)") from None
    if "lower_regions" in [*pipeline(level), *passes]:
        raise GraphoptError("lower_regions (part of O3) turns regions into compiled kernels, which an ONNX file "
                            "cannot hold; write ONNX with --level O2, and see the lowering with `graphopt explain`")


def read_onnx(path: Path) -> onnx.ModelProto:
    """Parse ``path`` as an ONNX model; anything that is not one is a user error."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf and onnx raise a variety of types for bad files
        raise GraphoptError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
                            f"pass a file written by onnx.save or torch.onnx.export") from None
    if not model.opset_import or not model.graph.output:
        raise GraphoptError(f"{path} holds no ONNX graph (no opset or no outputs); "
                            f"pass a file written by onnx.save or torch.onnx.export")
    return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    from .emitters.onnx import save_onnx

    save_onnx(model, path)


def write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same directory, so ``path`` is never left half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def op_table(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    """Node count per op type, total nodes and serialized size of both models."""
    counts_before, counts_after = op_counts(before), op_counts(after)
    rows = [(op, str(counts_before.get(op, 0)), str(counts_after.get(op, 0)))
            for op in sorted(counts_before.keys() | counts_after.keys())]
    rows.append(("total nodes", str(len(before.graph.node)), str(len(after.graph.node))))
    rows.append(("size (KiB)", f"{before.ByteSize() / 1024:.1f}", f"{after.ByteSize() / 1024:.1f}"))
    return format_table(("op type", "before", "after"), rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain-text table; ``align`` holds "<" or ">" per column (default: first left, others right)."""
    align = align or "<" + ">" * (len(header) - 1)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


# ---------------------------------------------------------------------- prune
PRUNE_IMPORTANCES = ("l1", "l2", "random")  # taylor needs example data a file does not carry


def cmd_prune(args: argparse.Namespace) -> int:
    from graphopt.passes.pruning.plan import PruningPlan, check_options, prune_graph

    from .api import load_onnx, optimize

    src = existing_file(args.input)
    dst = writable_path(args.output, src, "-o")
    plan_out = writable_path(args.plan_out, src, "--plan-out") if args.plan_out else None
    if plan_out == dst:
        raise GraphoptError(f"--plan-out and -o name the same file {dst}; give the plan its own path")
    if args.plan and args.ratio is not None:
        raise GraphoptError("--plan already chooses the channels; leave out --ratio")
    if args.importance not in PRUNE_IMPORTANCES:
        raise GraphoptError(f"unknown --importance {args.importance}; use one of {', '.join(PRUNE_IMPORTANCES)}")
    if args.check < 0:
        raise GraphoptError("--check needs N >= 0")
    ratio = 0.5 if args.ratio is None else args.ratio
    check_options(ratio=ratio, importance=args.importance, round_to=args.round_to, ranking=args.ranking)
    plan = PruningPlan.from_json(existing_file(args.plan).read_bytes()) if args.plan else None

    original = read_onnx(src)
    graph = optimize(load_onnx(original), level="O1")
    before = prune_stats(graph)
    if plan is None:
        ignored = split_names(args.ignore)
        plan = prune_graph(graph, ratio=ratio, importance=args.importance, round_to=args.round_to,
                           ignored=ignored, ranking=args.ranking)
    else:
        plan.apply(graph)
    pruned = graph.to_onnx()
    rows = [("groups pruned", "", str(len(plan.removals))), ("channels removed", "", str(plan.removed))]
    rows += [(name, f"{b:,}", f"{a:,}") for (name, b), a in zip(before.items(), prune_stats(graph).values())]
    rows.append(("size (KiB)", f"{original.ByteSize() / 1024:.1f}", f"{pruned.ByteSize() / 1024:.1f}"))
    print(format_table(("", "before", "after"), rows))
    if args.check:
        print(check_shapes(original, pruned, args.check))
    save_model(pruned, dst)
    print(f"wrote {dst}")
    if plan_out is not None:
        write_atomically(plan_out, plan.to_json().encode())
        print(f"wrote {plan_out}")
    return 0


def prune_stats(graph) -> dict[str, int]:
    from graphopt.passes.pruning.plan import count_macs, count_params

    return {"parameters": count_params(graph), "MACs": count_macs(graph), "nodes": len(graph)}


def check_shapes(before: onnx.ModelProto, after: onnx.ModelProto, runs: int) -> str:
    """Pruning changes the outputs, not their shapes: run both models and compare shapes and finiteness."""
    import numpy as np

    reference, candidate = ort_session(before), ort_session(after)
    worst_rel = 0.0
    for seed in range(runs):
        arrays = random_inputs(before, seed)
        expected, actual = run_session(reference, arrays), run_session(candidate, arrays)
        if [e.shape for e in expected] != [a.shape for a in actual]:
            raise CheckFailed(f"the pruned model's output shapes {[a.shape for a in actual]} differ from "
                              f"{[e.shape for e in expected]}; the output file was not written")
        if not all(np.isfinite(a).all() for a in actual if np.issubdtype(a.dtype, np.floating)):
            raise CheckFailed("the pruned model's outputs are not finite; the output file was not written")
        worst_rel = max([worst_rel, *(output_difference(e, a)[1] for e, a in zip(expected, actual))])
    return (f"check: {runs} random inputs, output shapes kept, largest difference from the unpruned model "
            f"{worst_rel:.3g} rel")


# ------------------------------------------------------------ check and bench
def ort_session(model: onnx.ModelProto) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def random_inputs(model: onnx.ModelProto, seed: int) -> list[np.ndarray]:
    """One random array per graph input; symbolic or unknown dims get size 1."""
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    arrays = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tensor_type = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim]
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if dtype == np.bool_:
            arrays.append(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            arrays.append(rng.integers(0, 4, size=shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def run_session(session: Any, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Feed ``arrays`` to the session's inputs by position (an optimizer may rename inputs)."""
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, arrays)))


def output_difference(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Largest absolute difference, and that relative to the largest expected magnitude."""
    import numpy as np

    if expected.shape != actual.shape:
        return float("inf"), float("inf")
    expected, actual = expected.astype(np.float64), actual.astype(np.float64)
    both_nan = np.isnan(expected) & np.isnan(actual)
    diff = np.where(both_nan, 0.0, np.abs(expected - actual))
    abs_err = float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
    scale = float(np.nan_to_num(np.abs(expected), nan=0.0).max(initial=0.0))
    return abs_err, abs_err / max(scale, 1e-12) if abs_err else 0.0


def check_outputs(before: onnx.ModelProto, after: onnx.ModelProto, runs: int, tol: float) -> str:
    """Compare both models on ``runs`` random inputs; raise ``CheckFailed`` beyond ``tol``."""
    reference, candidate = ort_session(before), ort_session(after)
    if len(reference.get_outputs()) != len(candidate.get_outputs()):
        raise CheckFailed(f"the optimized model has {len(candidate.get_outputs())} outputs, "
                          f"the original {len(reference.get_outputs())}")
    worst_abs = worst_rel = 0.0
    for seed in range(runs):
        arrays = random_inputs(before, seed)
        for expected, actual in zip(run_session(reference, arrays), run_session(candidate, arrays)):
            abs_err, rel_err = output_difference(expected, actual)
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    summary = (f"check: {runs} random inputs, largest difference {worst_abs:.3g} abs, "
               f"{worst_rel:.3g} rel (tolerance {tol:g} rel)")
    if worst_rel > tol:
        raise CheckFailed(f"{summary}; the output file was not written")
    return summary


def time_session(session: Any, arrays: Sequence[np.ndarray], repeat: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        run_session(session, arrays)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run_session(session, arrays)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_table(before: onnx.ModelProto, after: onnx.ModelProto, repeat: int) -> str:
    """onnxruntime latency of both models (ORT's own graph optimizations on, as users run it)."""
    arrays = random_inputs(before, seed=0)
    rows = []
    for label, model in (("before", before), ("after", after)):
        times = time_session(ort_session(model), arrays, repeat)
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        rows.append((label, f"{statistics.median(times):.3f}", f"{q1:.3f}-{q3:.3f}"))
    return format_table((f"onnxruntime ({repeat} runs)", "median ms", "IQR ms"), rows)


# -------------------------------------------------------------------- passes
def cmd_passes(args: argparse.Namespace) -> int:
    from .pass_manager import PASSES, PIPELINES, pipeline

    pipeline("O0")  # loads the built-in passes
    rows = [(name, cls.kind.value, cls.summary()) for name, cls in sorted(PASSES.items())]
    print(format_table(("pass", "kind", "summary"), rows, align="<<<"))
    print("\npipelines:")
    for level, names in PIPELINES.items():
        print(f"  {level}: {', '.join(names) or '(no passes)'}")
    return 0


# ------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import load_onnx

    src = existing_file(args.input)
    model = read_onnx(src)
    print(model_summary(src, model))
    graph = load_onnx(model)
    counts = graph.op_counts()
    opaque = sum(1 for n in graph.nodes if n.opdef.category == "opaque")
    print(f"\nIR after load: {len(graph)} nodes, {opaque} opaque")
    print(format_table(("IR op", "count"), [(op, str(k)) for op, k in counts.items()]))
    return 0


def model_summary(path: Path, model: onnx.ModelProto) -> str:
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in ((o.domain, o.version) for o in model.opset_import))
    lines = [f"{path.name}: ir_version {model.ir_version}, opsets {opsets}, "
             f"producer {model.producer_name or '?'} {model.producer_version}".rstrip()]
    initializers = {t.name for t in model.graph.initializer}
    lines.append("inputs:")
    lines += [f"  {value_signature(v)}" for v in model.graph.input if v.name not in initializers]
    lines.append("outputs:")
    lines += [f"  {value_signature(v)}" for v in model.graph.output]
    elements, size = parameter_size(model)
    lines.append(f"parameters: {len(model.graph.initializer)} initializers, {elements:,} elements, "
                 f"{size / 1024:.1f} KiB")
    lines.append(f"ONNX nodes: {len(model.graph.node)}")
    lines.append(format_table(("op type", "count"), [(op, str(k)) for op, k in sorted(op_counts(model).items())]))
    return "\n".join(lines)


def value_signature(value: onnx.ValueInfoProto) -> str:
    from onnx.helper import tensor_dtype_to_np_dtype

    tensor_type = value.type.tensor_type
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    dtype = tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type else "?"
    return f"{value.name}: {dtype}[{', '.join(dims)}]"


def parameter_size(model: onnx.ModelProto) -> tuple[int, int]:
    """Total elements and bytes of the initializers."""
    from onnx.helper import tensor_dtype_to_np_dtype

    elements = size = 0
    for t in model.graph.initializer:
        count = 1
        for d in t.dims:
            count *= d
        elements += count
        size += count * tensor_dtype_to_np_dtype(t.data_type).itemsize
    return elements, size


# ------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    from .api import explain, load_onnx
    from .backends.explain import explain_json, explain_table

    src = existing_file(args.input)
    out = writable_path(args.json, src, "--json") if args.json else None
    model = read_onnx(src)
    fixed = fix_symbolic_dims(model, parse_dims(args.dim))
    options: dict[str, Any] = {"cost_model": args.cost_model, "expected_calls": args.expected_calls,
                               "forbid": tuple(split_names(args.forbid)), "force": args.force, "source": src.stem}
    if args.backends:
        options["backends"] = tuple(split_names(args.backends))
    if args.expected_calls < 1:
        raise InvalidOptionError(f"--expected-calls must be at least 1, got {args.expected_calls}")
    if fixed:
        print("symbolic dims fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    decisions = explain(load_onnx(model), level=args.level, **options)
    print(explain_table(decisions))
    if out is not None:
        write_atomically(out, explain_json(decisions).encode())
    return 0


def split_names(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]``: the comma-separated lists of the options."""
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise InvalidOptionError(f"--dim takes NAME=N with N a positive integer, got {item!r}")
        dims[name] = int(value)
    return dims


def fix_symbolic_dims(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, int]:
    """Give every symbolic input dimension a value (``dims``, else 1), in place; the values used."""
    initializers = {t.name for t in model.graph.initializer}
    fixed: dict[str, int] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                name = d.dim_param or "?"
                fixed[name] = dims.get(name, 1)
                d.dim_value = fixed[name]
    unknown = sorted(set(dims) - set(fixed))
    if unknown:
        raise InvalidOptionError(f"--dim names no symbolic input dimension: {', '.join(unknown)}; "
                                 f"the model's are: {', '.join(fixed) or 'none'}")
    return fixed


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(run_demo(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
