"""Every canonical op has, in every table keyed by op, a row or a stated reason for having none.

The tables: the ONNX emitter, the ATen and ONNX importers, the pruning rules,
and what the TVM and Triton backends compile. An op registered without a row
in one of them, and without an entry in that table's declaration of what it
leaves out and why, fails here with the op and the table named; so adding an
op is its definition plus its table rows (or reasons).

The importers are keyed by the framework's op, not the IR's: the IR ops they
build are read off their handlers' source (the op names given to the context's
builders, through locals, closures, module-level tables and helper calls).
"""
import ast
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from graphopt.backends import triton_codegen, tvm
from graphopt.emitters.onnx_table import EMITTERS
from graphopt.frontends import aten_table, onnx_table
from graphopt.ir import OPS, OpDef, get_op
from graphopt.passes.pruning import dependency


@dataclass(frozen=True)
class Table:
    name: str
    has_row: Callable[[str], bool]
    not_covered: Mapping[str, str]
    """The ops it deliberately has no row for, each with the reason."""


def is_canonical(opdef: OpDef) -> bool:
    """Target ops (``ort.*``: they exist only once a graph is lowered for that runtime) and opaque calls
    (foreign code the IR does not describe) have no rows anywhere by design."""
    return "." not in opdef.name and opdef.category != "opaque"


def canonical_ops() -> list[OpDef]:
    get_op("add")  # loads the built-in ops
    return [opdef for _, opdef in sorted(OPS.items()) if is_canonical(opdef)]


def aten_imports() -> frozenset[str]:
    packets: dict[Callable, list[str]] = {}
    for overload, handler in aten_table.TABLE.items():
        packets.setdefault(handler, []).append(overload.overloadpacket.__name__)
    return frozenset(op for handler, names in packets.items() for op in ops_built_by(handler, {"emit", "inner"}, names))


def onnx_imports() -> frozenset[str]:
    handlers = set(onnx_table.IMPORTERS.values())
    return frozenset(op for handler in handlers for op in ops_built_by(handler, {"op", "op_multi"}))


def tables() -> list[Table]:
    aten, onnx, lowered = aten_imports(), onnx_imports(), triton_codegen.lowered_ops()
    return [
        Table("onnx emitter", EMITTERS.__contains__, {}),
        Table("aten importer", aten.__contains__, aten_table.NOT_IMPORTED),
        Table("onnx importer", onnx.__contains__, onnx_table.NOT_IMPORTED),
        Table("pruning rule", dependency.RULES.__contains__, dependency.NOT_MODELLED),
        Table("tvm", lambda op: op not in tvm.UNSUPPORTED, tvm.UNSUPPORTED),  # it compiles all but what it lists
        Table("triton", lowered.__contains__, triton_codegen.NOT_LOWERED),
    ]


def missing_declarations(opdef: OpDef, tables: list[Table]) -> list[str]:
    """One line per table where ``opdef`` has neither a row nor a reason."""
    return [f"{opdef.name}: no {t.name} row, and no reason in that table's declaration of what it leaves out"
            for t in tables if not t.has_row(opdef.name) and opdef.name not in t.not_covered]


def coverage_table(ops: list[OpDef], tables: list[Table]) -> str:
    """``op  x  -  ?`` per table: a row, a declared gap, neither."""
    def cell(t: Table, op: str) -> str:
        return "x" if t.has_row(op) else "-" if op in t.not_covered else "?"
    header = f"{'op':20}" + "".join(f"{t.name:>15}" for t in tables)
    return "\n".join([header, *(f"{d.name:20}" + "".join(f"{cell(t, d.name):>15}" for t in tables) for d in ops)])


def test_every_canonical_op_has_a_row_or_a_reason_in_every_table():
    ops, ts = canonical_ops(), tables()
    print(coverage_table(ops, ts))
    missing = [line for opdef in ops for line in missing_declarations(opdef, ts)]
    assert not missing, "\n".join(missing)


def test_a_declared_gap_is_a_real_one():
    """A reason for an op that has a row, or that no longer exists, is stale."""
    registered = {d.name for d in canonical_ops()}
    stale = [f"{t.name}: declares {op} uncovered, but it {'has a row' if t.has_row(op) else 'is no canonical op'}"
             for t in tables() for op in t.not_covered if t.has_row(op) or op not in registered]
    assert not stale, "\n".join(stale)


def cube_root(x: torch.Tensor) -> torch.Tensor:
    return x.sign() * x.abs().pow(1 / 3)


def test_an_op_registered_without_declarations_fails_the_check():
    new_op = OpDef("cube_root", cube_root)  # made, never registered: the registry stays as it was
    assert missing_declarations(new_op, tables()) == [
        f"cube_root: no {name} row, and no reason in that table's declaration of what it leaves out"
        for name in ("onnx emitter", "aten importer", "onnx importer", "pruning rule", "triton")]
    assert "cube_root" not in OPS


def test_the_importer_scan_sees_ops_built_through_closures_helpers_and_locals():
    aten, onnx = aten_imports(), onnx_imports()
    assert {"relu", "softmax", "sum", "sdpa", "add", "argmax"} <= aten  # closures, a helper, ATen's own name
    assert {"relu", "maximum", "argmin", "leaky_relu", "mean"} <= onnx  # module tables, locals, tuples
    assert "linear" not in onnx  # Resize's mode string is no op it builds


# ------------------------------------------------------------- the scan
def ops_built_by(fn: Callable, builders: set[str], target_names=(), seen: set | None = None) -> set[str]:
    """The op names ``fn`` (and the module-level helpers it calls) may pass to ``cx.<builder>(op, ...)``.

    ``target_names`` stand for ``cx.target_name``: the ATen packets the handler is registered for.
    """
    seen = set() if seen is None else seen
    if fn in seen:
        return set()
    seen.add(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    module = sys.modules[fn.__module__]
    closure = inspect.getclosurevars(fn).nonlocals
    assigned: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for name in (n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)):
                assigned.setdefault(name, []).append(node.value)

    def strings(expr: ast.expr, depth: int = 0) -> set[str]:
        found = set()
        for n in ast.walk(expr):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                found.add(n.value)
            elif isinstance(n, ast.Attribute) and n.attr == "target_name":
                found |= set(target_names)
            elif isinstance(n, ast.Name) and n.id in assigned and depth < 3:
                found |= {s for e in assigned[n.id] for s in strings(e, depth + 1)}
            elif isinstance(n, ast.Name):
                found |= set(strings_in(closure.get(n.id, getattr(module, n.id, None))))
        return found

    built = set()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Attribute) and call.func.attr in builders and call.args:
            built |= strings(call.args[0])
        elif isinstance(call.func, ast.Name):
            helper = getattr(module, call.func.id, None)
            if inspect.isfunction(helper) and helper.__module__ == fn.__module__:
                built |= ops_built_by(helper, builders, (), seen)
    return built & set(OPS)


def strings_in(obj) -> Iterator[str]:
    """The strings of a constant table (a str, or containers of them); nothing from functions or modules."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            yield from strings_in(x)
