"""The ``graphopt`` command: optimize, prune, inspect and compare ONNX models; list passes; run the demo.

Exit codes: 0 success, 2 user error (one ``graphopt: error: ...`` line on stderr,
no output file written), 3 ``--check`` found outputs further apart than ``--tol``
or the optimized model fails in onnxruntime (``prune``: outputs that changed shape or
are not finite; no output file written), 128+N killed by signal N (no output file written).
Any other failure is a bug and shows its traceback. A run writes all of its outputs or none.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import GraphoptError, InvalidOptionError

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from .ir import Graph

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 3


class CheckFailed(Exception):
    """``--check`` found the optimized model's outputs too far from the original's, or it fails to run."""


class CheckSkipped(Exception):
    """The original model cannot be run on random inputs, so there is nothing to compare against."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one ``graphopt: error:`` line, like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise GraphoptError(f"{message} (see `{self.prog} --help`)")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        set_log_levels(args.verbose)
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
    from .emitters.onnx import MIN_OPSET, TARGETS

    parser = Parser(prog="graphopt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="also show graphopt's INFO log and onnxruntime's own warnings")

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], **kwargs)

    opt = add_command("optimize", help="optimize an ONNX model and print what changed")
    opt.add_argument("input", metavar="IN.onnx")
    opt.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    opt.add_argument("--level", default="O2", help="pipeline to run (default: O2; see `graphopt passes`)")
    opt.add_argument("--passes", default="", metavar="A,B", help="extra passes to run after the pipeline")
    opt.add_argument("--target", default="onnx", choices=TARGETS,
                     help="onnx: standard ops only (default); onnxruntime: also its fused contrib ops; "
                          "onnxruntime-cpu: also its NCHWc conv layout, for CPUs like this one only")
    opt.add_argument("--opset", type=integer(MIN_OPSET, onnx_opset()), metavar="N",
                     help=f"opset to write, {MIN_OPSET} to {onnx_opset()} (default: the input's); "
                          f"23 and up lowers attention to Attention")
    opt.add_argument("--check", type=integer(0), default=0, metavar="N",
                     help="run N random inputs through onnxruntime on both models and compare the outputs")
    opt.add_argument("--tol", type=number(0.0), default=1e-4,
                     help="largest relative difference --check accepts (default: 1e-4)")
    opt.add_argument("--bench", action="store_true", help="time both models with onnxruntime")
    opt.add_argument("--repeat", type=integer(1), default=20, help="timed runs per model for --bench (default: 20)")
    opt.add_argument("--report", metavar="R.json", help="write the pass report (JSON) here")
    opt.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                     help="print the graph to stderr after each run of PASS (repeatable)")
    opt.add_argument("--dump-dir", metavar="DIR",
                     help="write --dump-after graphs here instead, one file per run, and under GRAPHOPT_DEBUG=1 "
                          "the graph before and after a pass that breaks it")
    opt.add_argument("--time-passes", action="store_true", help="print the time spent in each pass to stderr")
    opt.set_defaults(command=cmd_optimize)

    prune = add_command("prune", help="remove channels (structured pruning) and print the savings")
    prune.add_argument("input", metavar="IN.onnx")
    prune.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    prune.add_argument("--ratio", type=number(0.0, 1.0, upper_open=True), metavar="R",
                       help="share of each group's channels to remove, in [0, 1) (default: 0.5)")
    prune.add_argument("--importance", default="l2", metavar="l1|l2|random",
                       help="how channels are ranked (default: l2 magnitude)")
    prune.add_argument("--ranking", default="layer", metavar="layer|global",
                       help="remove the ratio from every group (default) or from all channels together")
    prune.add_argument("--round-to", type=integer(1), metavar="N", help="keep channel counts multiples of N")
    prune.add_argument("--ignore", default="", metavar="A,B", help="layers (parameter, node or module names) to keep")
    prune.add_argument("--plan", metavar="PLAN.json", help="apply this saved plan instead of ranking channels")
    prune.add_argument("--plan-out", metavar="PLAN.json", help="write the plan applied here")
    prune.add_argument("--check", type=integer(0), default=0, metavar="N",
                       help="run N random inputs through onnxruntime on both models; outputs must keep their shapes")
    prune.set_defaults(command=cmd_prune)

    passes = add_command("passes", help="list the registered passes and pipelines")
    passes.set_defaults(command=cmd_passes)

    inspect = add_command("inspect", help="summarize an ONNX model and its IR")
    inspect.add_argument("input", metavar="IN.onnx")
    inspect.set_defaults(command=cmd_inspect)

    explain = add_command("explain", help="show which backend each region of a model would run on, and why")
    explain.add_argument("input", metavar="IN.onnx")
    explain.add_argument("--level", default="O2", help="pipeline to run before lowering (default: O2)")
    explain.add_argument("--backends", metavar="A,B", help="candidate backends (default: all built in)")
    explain.add_argument("--forbid", default="", metavar="A,B", help="backends never to choose")
    explain.add_argument("--force", metavar="NAME", help="choose this backend wherever it supports a region")
    explain.add_argument("--cost-model", default="measured", choices=("measured", "analytical", "learned"),
                         help="what decides (default: measured; predictions are shown beside it)")
    explain.add_argument("--expected-calls", type=integer(1), default=1000, metavar="N",
                         help="calls that compile time is spread over (default: 1000)")
    explain.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                         help="value of a symbolic input dimension (default: 1 for each)")
    explain.add_argument("--json", metavar="OUT.json", help="also write the decisions as JSON here")
    explain.set_defaults(command=cmd_explain)

    demo = add_command("demo", help="optimize a ResNet, a ViT and a DiT and compare with eager")
    demo.add_argument("--quick", action="store_true", help="only the first model, fewer timing runs")
    demo.set_defaults(command=cmd_demo)
    return parser


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        return value
    return parse


def number(low: float, high: float | None = None, upper_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or [low, high) with ``upper_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        too_high = high is not None and (value >= high if upper_open else value > high)
        if not math.isfinite(value) or value < low or too_high:
            bounds = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}{')' if upper_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text!r}")
        return value
    return parse


def onnx_opset() -> int:
    """The newest opset the installed onnx defines: a model of a later one is not valid ONNX."""
    import onnx.defs

    return onnx.defs.onnx_opset_version()


def set_log_levels(verbose: bool) -> None:
    """Show graphopt's own lines only; at ``--verbose`` also its INFO log and onnxruntime's warnings.

    onnxruntime's C++ logger writes straight to the process's stderr when a session is made
    (e.g. "Initializer ... appears in graph inputs") or fails; every session in this process that
    does not set its own ``log_severity_level`` follows the default logger's severity set here.
    Its errors are not lost: the ``--check`` line that they cause quotes them.
    """
    import onnxruntime

    onnxruntime.set_default_logger_severity(2 if verbose else 4)  # 2: warnings and up, 4: fatal only
    if verbose:
        logging.basicConfig(level=logging.INFO, format="graphopt: %(name)s: %(message)s")


def warn(message: str) -> None:
    print(f"graphopt: warning: {message}", file=sys.stderr)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Outputs:
    """Everything a command writes, written together or not at all.

    Each output path is checked before any work by creating a hidden temporary directory
    beside it; its file is written there and ``commit`` moves all of them into place once
    all are written. Leaving the ``with`` block (an error, SIGTERM or SIGINT: exit 128 + the
    signal number) removes what was not committed. Written files get the mode ``0o666 & ~umask``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, src: Path):
        self.src = src
        self.flags: dict[Path, str] = {}
        self.staging: dict[Path, Path] = {}  # target -> its temporary directory
        self.mode = 0o666 & ~current_umask()
        self.previous_handlers: dict[int, Any] = {}

    def __enter__(self) -> Outputs:
        if threading.current_thread() is threading.main_thread():  # only it may set signal handlers
            for sig in self.SIGNALS:
                self.previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> NoReturn:
        self.discard()
        raise SystemExit(128 + signum)

    def path(self, name: str | None, flag: str) -> Path | None:
        """Check an output path up front: not the input, not another output, in a directory we can write."""
        if name is None:
            return None
        path = Path(name).resolve()
        if path == self.src or (path.exists() and path.samefile(self.src)):  # a symlink or a hard link to it
            raise GraphoptError(f"{flag} {name} is the input file; write to a different path")
        if path in self.flags:
            raise GraphoptError(f"{flag} and {self.flags[path]} name the same file {name}; give each its own path")
        if path.is_dir():
            raise GraphoptError(f"{flag} {name} is a directory; give a file name")
        if path.exists() and not path.is_file():
            raise GraphoptError(f"{flag} {name} exists and is not a regular file; give the path of a file")
        if not path.parent.is_dir():
            raise GraphoptError(f"{flag}: directory {path.parent} does not exist; create it first")
        with blocked(self.SIGNALS):  # a signal between creating and recording it would leave it behind
            try:
                self.staging[path] = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            except OSError as e:
                raise GraphoptError(f"{flag}: cannot write in directory {path.parent} ({e.strerror or e}); "
                                    f"choose a writable location") from None
        self.flags[path] = flag
        return path

    def stage(self, path: Path, write: Callable[[Path], Any]) -> None:
        """Write ``path``'s content now, into its temporary directory (``write`` gets the path to write)."""
        staging = self.staging[path]
        try:
            write(staging / path.name)
            for written in staging.iterdir():
                written.chmod(self.mode)
        except OSError as e:
            raise GraphoptError(f"{self.flags[path]}: cannot write {path} ({e.strerror or e}); "
                                f"check the free space and the path") from None

    def commit(self) -> list[Path]:
        """Move every written file into place; returns the targets written, in the order given."""
        done = []
        with blocked(self.SIGNALS):
            for path, staging in self.staging.items():
                written = sorted(staging.iterdir())
                for file in written:
                    os.replace(file, path.parent / file.name)
                staging.rmdir()
                if written:
                    done.append(path)
            self.staging = {}
        return done

    def discard(self) -> None:
        for staging in self.staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self.staging = {}


@contextlib.contextmanager
def blocked(signals: Sequence[int]) -> Iterator[None]:
    """Hold ``signals`` until the block is done (delivered after it, not lost)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -------------------------------------------------------------------- optimize
def cmd_optimize(args: argparse.Namespace) -> int:
    from .api import load_onnx, optimize
    from .passes.targets import optimize_for_target

    src = existing_file(args.input)
    passes = split_names(args.passes)
    check_pipeline(args.level, passes)
    with Outputs(src) as outputs:
        dst = outputs.path(args.output, "-o")
        report_path = outputs.path(args.report, "--report")
        original = read_onnx(src)
        graph = optimize(note_conversion(load_onnx(original), src), level=args.level, passes=passes,
                         instruments=pass_instruments(args), dump_dir=args.dump_dir)
        opset = emit_opset(graph, args.opset)
        graph = optimize_for_target(graph, args.target, opset)
        optimized = graph.to_onnx(opset=opset, target=args.target)
        print(op_table(original, optimized))
        if args.check:
            print_or_skip("--check", lambda: check_outputs(original, optimized, args.check, args.tol))
        if args.bench:
            print_or_skip("--bench", lambda: bench_table(original, optimized, args.repeat))
        outputs.stage(dst, lambda path: save_model(optimized, path))
        if report_path is not None:
            outputs.stage(report_path, lambda path: path.write_bytes(graph.meta["report"].to_json().encode()))
        for path in outputs.commit():
            print(f"wrote {path}")
    return 0


def pass_instruments(args: argparse.Namespace) -> list[Any]:
    """What ``--dump-after`` and ``--time-passes`` ask to see of the pass run."""
    from .pass_manager import DumpAfter, TimePasses

    if args.dump_dir is not None:
        try:
            Path(args.dump_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GraphoptError(f"--dump-dir: cannot create directory {args.dump_dir} ({e.strerror or e}); "
                                f"choose a writable location") from None
    chosen: list[Any] = [DumpAfter(args.dump_after, args.dump_dir)] if args.dump_after else []
    if args.time_passes:
        chosen.append(TimePasses())
    return chosen


def print_or_skip(flag: str, run: Callable[[], str]) -> None:
    """Print what a check or benchmark found, or one warning line when the original model cannot be run."""
    try:
        print(run())
    except CheckSkipped as e:
        warn(f"{flag} skipped: {e}")


def existing_file(name: str) -> Path:
    path = Path(name).resolve()
    if not path.exists():
        raise GraphoptError(f"input file {name} does not exist; check the path")
    if not path.is_file():
        raise GraphoptError(f"input {name} is not a file; pass the path of an .onnx model")
    return path


def emit_opset(graph, opset: int | None) -> int | None:
    """The opset to write (its range is checked when parsing), refused where graphopt cannot write it faithfully."""
    if opset is None:
        return None
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
    except InvalidOptionError as e:
        raise InvalidOptionError(f"{e} (see `graphopt passes`)") from None
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


def note_conversion(graph: Graph, src: Path) -> Graph:
    """Say on stderr when load_onnx converted an old opset, and pass the graph on."""
    opset = graph.meta.get("onnx", {}).get("converted_from_opset")
    if opset is not None:
        target = graph.meta["onnx"]["opset_imports"].get("", "")
        print(f"graphopt: converted {src.name} from opset {opset} to {target} (onnx version converter)",
              file=sys.stderr)
    return graph


def save_model(model: onnx.ModelProto, path: Path) -> None:
    from .emitters.onnx import save_onnx

    save_onnx(model, path)


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
    from graphopt.passes.pruning.plan import PruningPlan, check_options

    src = existing_file(args.input)
    if args.plan and args.ratio is not None:
        raise GraphoptError("--plan already chooses the channels; leave out --ratio")
    if args.importance not in PRUNE_IMPORTANCES:
        raise GraphoptError(f"unknown --importance {args.importance}; use one of {', '.join(PRUNE_IMPORTANCES)}")
    ratio = 0.5 if args.ratio is None else args.ratio
    check_options(ratio=ratio, importance=args.importance, round_to=args.round_to, ranking=args.ranking)
    plan = PruningPlan.from_json(existing_file(args.plan).read_bytes()) if args.plan else None
    with Outputs(src) as outputs:
        dst = outputs.path(args.output, "-o")
        plan_out = outputs.path(args.plan_out, "--plan-out")
        return prune_model(args, src, dst, plan_out, ratio, plan, outputs)


def prune_model(args: argparse.Namespace, src: Path, dst: Path, plan_out: Path | None, ratio: float,
                plan: Any, outputs: Outputs) -> int:
    from graphopt.passes.pruning.plan import prune_graph

    from .api import load_onnx, optimize

    original = read_onnx(src)
    graph = optimize(note_conversion(load_onnx(original), src), level="O1")
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
        print_or_skip("--check", lambda: check_shapes(original, pruned, args.check))
    outputs.stage(dst, lambda path: save_model(pruned, path))
    if plan_out is not None:
        outputs.stage(plan_out, lambda path: path.write_bytes(plan.to_json().encode()))
    for path in outputs.commit():
        print(f"wrote {path}")
    return 0


def prune_stats(graph) -> dict[str, int]:
    from graphopt.passes.pruning.plan import count_macs, count_params

    return {"parameters": count_params(graph), "MACs": count_macs(graph), "nodes": len(graph)}


def check_shapes(before: onnx.ModelProto, after: onnx.ModelProto, runs: int) -> str:
    """Pruning changes the outputs, not their shapes: run both models and compare shapes and finiteness."""
    import numpy as np

    from .testing import output_difference

    inputs, expected_runs = reference_outputs(before, runs)
    candidate = ort_session(after, "the pruned model", CheckFailed)
    worst_rel = 0.0
    for arrays, expected in zip(inputs, expected_runs):
        actual = run_session(candidate, arrays, "the pruned model", CheckFailed, after)
        if [e.shape for e in expected] != [a.shape for a in actual]:
            raise CheckFailed(f"the pruned model's output shapes {[a.shape for a in actual]} differ from "
                              f"{[e.shape for e in expected]}; the output file was not written")
        if not all(np.isfinite(a).all() for a in actual if np.issubdtype(a.dtype, np.floating)):
            raise CheckFailed("the pruned model's outputs are not finite; the output file was not written")
        worst_rel = max([worst_rel, *(output_difference(e, a)[1] for e, a in zip(expected, actual))])
    return (f"check: {runs} random inputs, output shapes kept, largest difference from the unpruned model "
            f"{worst_rel:.3g} rel")


# ------------------------------------------------------------ check and bench
def first_line(exc: BaseException) -> str:
    """The gist of a library's (often many-line) error message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def ort_session(model: onnx.ModelProto, what: str = "the model", failure: type[Exception] = CheckFailed) -> Any:
    """A CPU session for ``model``; a model onnxruntime cannot load raises ``failure`` naming ``what``."""
    from .backends._onnxruntime import inference_session

    try:
        return inference_session(model)
    except Exception as e:  # onnxruntime's error classes share no base below Exception
        raise failure(f"onnxruntime cannot load {what} ({first_line(e)})") from None


PACKED_TYPES = ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")  # two or more values a byte


def random_inputs(model: onnx.ModelProto, seed: int) -> list[Any]:
    """One random value per graph input; symbolic or unknown dims get size 1.

    Types numpy hands to onnxruntime directly become arrays; bfloat16 and float8 become
    ``OrtValue``s. An input no random value can be made for raises ``CheckSkipped``.
    """
    import numpy as np
    import onnxruntime
    from onnx import TensorProto
    from onnx.helper import tensor_dtype_to_np_dtype

    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    values = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        kind = inp.type.WhichOneof("value")
        if kind != "tensor_type":
            raise CheckSkipped(f"input {inp.name!r} is a {(kind or 'value of no type').removesuffix('_type')}, "
                               f"and random inputs are made for tensors only")
        tensor_type = inp.type.tensor_type
        elem_name = TensorProto.DataType.Name(tensor_type.elem_type)
        if tensor_type.elem_type == TensorProto.UNDEFINED or elem_name in PACKED_TYPES or "COMPLEX" in elem_name:
            raise CheckSkipped(f"input {inp.name!r} has element type {elem_name.lower()}, "
                               f"for which no random input is made")
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim]
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if dtype == np.bool_:
            array = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            array = np.asarray(rng.integers(0, 4, size=shape)).astype(dtype)
        elif dtype == np.object_:
            array = np.asarray(rng.integers(0, 4, size=shape)).astype(str).astype(object)
        else:
            array = np.asarray(rng.standard_normal(shape)).astype(dtype)
        if dtype.kind == "V" or dtype.type.__module__.startswith("ml_dtypes"):  # bfloat16, float8: by their bits
            bits = array.view(np.dtype(f"uint{8 * dtype.itemsize}"))
            values.append(onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, tensor_type.elem_type))
        else:
            values.append(array)
    return values


def run_session(session: Any, arrays: Sequence[Any], what: str = "the model",
                failure: type[Exception] = CheckFailed, model: onnx.ModelProto | None = None) -> list[np.ndarray]:
    """Feed ``arrays`` to the session's inputs by position (an optimizer may rename inputs).

    Outputs come back as numpy arrays of the model's declared types (onnxruntime hands float8 back as bits).
    """
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    names = [i.name for i in session.get_inputs()]
    try:
        outputs = session.run(None, dict(zip(names, arrays)))
    except Exception as e:  # onnxruntime's error classes share no base below Exception
        raise failure(f"onnxruntime cannot run {what} on random inputs ({first_line(e)})") from None
    if model is None:
        return outputs
    declared = [o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else 0 for o in model.graph.output]
    for i, (out, elem_type) in enumerate(zip(outputs, declared)):
        if isinstance(out, np.ndarray) and elem_type:
            dtype = np.dtype(tensor_dtype_to_np_dtype(elem_type))
            if dtype != out.dtype and dtype.itemsize == out.dtype.itemsize:
                outputs[i] = out.view(dtype)
    return outputs


def reference_outputs(model: onnx.ModelProto, runs: int) -> tuple[list[list[Any]], list[list[np.ndarray]]]:
    """Random inputs and the original model's outputs on them; ``CheckSkipped`` where either cannot be made."""
    inputs = [random_inputs(model, seed) for seed in range(runs)]
    session = ort_session(model, "the original model", CheckSkipped)
    return inputs, [run_session(session, arrays, "the original model", CheckSkipped, model) for arrays in inputs]


def check_outputs(before: onnx.ModelProto, after: onnx.ModelProto, runs: int, tol: float) -> str:
    """Compare both models on ``runs`` random inputs; raise ``CheckFailed`` beyond ``tol``.

    ``CheckSkipped`` where the original cannot run: there is nothing to compare with.
    """
    from .testing import output_difference

    inputs, expected_runs = reference_outputs(before, runs)
    candidate = ort_session(after, "the optimized model", CheckFailed)
    if len(after.graph.output) != len(before.graph.output):
        raise CheckFailed(f"the optimized model has {len(after.graph.output)} outputs, "
                          f"the original {len(before.graph.output)}")
    worst_abs = worst_rel = 0.0
    for arrays, expected in zip(inputs, expected_runs):
        actual = run_session(candidate, arrays, "the optimized model", CheckFailed, after)
        for e, a in zip(expected, actual):
            abs_err, rel_err = output_difference(e, a)
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    summary = (f"check: {runs} random inputs, largest difference {worst_abs:.3g} abs, "
               f"{worst_rel:.3g} rel (tolerance {tol:g} rel)")
    if not worst_rel <= tol:
        raise CheckFailed(f"{summary}; the output file was not written")
    return summary


def time_session(session: Any, arrays: Sequence[Any], repeat: int, what: str, failure: type[Exception],
                 warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        run_session(session, arrays, what, failure)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run_session(session, arrays, what, failure)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_table(before: onnx.ModelProto, after: onnx.ModelProto, repeat: int) -> str:
    """onnxruntime latency of both models (ORT's own graph optimizations on, as users run it).

    ``CheckSkipped`` where the original cannot run; ``CheckFailed`` where only the optimized model fails.
    """
    arrays = random_inputs(before, seed=0)
    rows = []
    for label, model, what, failure in (("before", before, "the original model", CheckSkipped),
                                        ("after", after, "the optimized model", CheckFailed)):
        times = time_session(ort_session(model, what, failure), arrays, repeat, what, failure)
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
    graph = note_conversion(load_onnx(model), src)
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
    src = existing_file(args.input)
    with Outputs(src) as outputs:
        out = outputs.path(args.json, "--json")
        explain_model(args, src, out, outputs)
    return 0


def explain_model(args: argparse.Namespace, src: Path, out: Path | None, outputs: Outputs) -> None:
    from .api import explain, load_onnx
    from .backends.explain import explain_json, explain_table

    model = read_onnx(src)
    fixed = fix_symbolic_dims(model, parse_dims(args.dim))
    options: dict[str, Any] = {"cost_model": args.cost_model, "expected_calls": args.expected_calls,
                               "forbid": tuple(split_names(args.forbid)), "force": args.force, "source": src.stem}
    if args.backends:
        options["backends"] = tuple(split_names(args.backends))
    if fixed:
        print("symbolic dims fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    decisions = explain(note_conversion(load_onnx(model), src), level=args.level, **options)
    print(explain_table(decisions))
    if out is not None:
        outputs.stage(out, lambda path: path.write_text(explain_json(decisions)))
        outputs.commit()


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
