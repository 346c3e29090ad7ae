"""The IR's own API: the helpers every pass needs, O(1) rewiring, and a floor that imports nothing above it."""
import ast
import pathlib

import pytest
import torch

from graphopt.ir import Graph, TensorType

IR_DIR = pathlib.Path(__file__).parents[2] / "graphopt" / "ir"
F32 = torch.float32


def chain():
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 3)))
    relu = g.add_node("relu", [x])
    neg = g.add_node("neg", [relu.output])
    g.outputs = [neg.output]
    return g, x, relu, neg


def test_graph_output_and_sole_user():
    g, x, relu, neg = chain()
    assert neg.output.is_graph_output and not relu.output.is_graph_output
    assert relu.output.sole_user is neg
    assert neg.output.sole_user is None  # read by the model's caller
    g.add_node("exp", [relu.output])
    assert relu.output.sole_user is None


def test_replace_by_keeps_the_output_name_so_the_interface_is_unchanged():
    g, x, relu, neg = chain()
    tanh = g.add_node("tanh", [relu.output])
    assert neg.output.can_be_replaced_by(tanh.output)
    assert not neg.output.can_be_replaced_by(x)  # an output never becomes the input's name
    neg.output.replace_by(tanh.output)
    assert g.outputs == [tanh.output] and tanh.output.name == "neg"
    assert neg.is_unused
    g.remove_node(neg)
    g.verify()


def test_rename_and_remove_constant_keep_the_name_table():
    g, x, relu, neg = chain()
    w = g.add_constant(torch.ones(3), "w")
    assert g.rename(w, "x") == "x_0"  # taken by the input
    assert set(g.constants) == {"x_0"}
    g.verify()
    user = g.add_node("mul", [neg.output, w])
    assert not g.remove_constant(w)  # still read
    g.remove_node(user)
    assert g.remove_constant(w) and not g.constants
    assert g.add_constant(torch.zeros(1), "x_0").name == "x_0"  # the name is free again


def test_node_purity_comes_from_the_registry_and_the_node():
    g, x, *_ = chain()
    assert g.add_node("dropout", [x], {"p": 0.1}).is_pure  # inference mode
    assert not g.add_node("dropout", [x], {"p": 0.1, "training": True}).is_pure


def test_insertion_and_removal_keep_order_in_constant_time():
    g, x, relu, neg = chain()
    first = g.add_node("exp", [x], before=relu)
    middle = g.add_node("abs", [relu.output], after=relu)
    assert [n.op for n in g] == ["exp", "relu", "abs", "neg"] and len(g) == 4
    g.remove_node(middle)
    g.remove_node(first)
    assert [n.op for n in g] == ["relu", "neg"] and len(g) == 2
    g.reorder([neg, relu])
    with pytest.raises(Exception, match="used before it is defined"):
        g.verify()
    g.sort()
    assert [n.op for n in g] == ["relu", "neg"]


def test_many_uses_rewire_in_constant_time_each():
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2,)))
    users = [g.add_node("neg", [x]) for _ in range(2000)]
    y = g.add_input("y", TensorType(F32, (2,)))
    assert x.replace_all_uses_with(y) == 2000
    assert not x.uses() and [n for n, _ in y.uses()] == users


def test_the_ir_floor_imports_nothing_above_it():
    offenders = []
    for path in IR_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                depth = len(path.relative_to(IR_DIR).parts) - 1  # how many levels below graphopt/ir
                outside = (node.level > depth + 1) or (node.level == 0 and (node.module or "").startswith("graphopt")
                                                       and not node.module.startswith("graphopt.ir"))
                if outside:
                    offenders.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names
                              if a.name.startswith("graphopt") and not a.name.startswith("graphopt.ir")]
    assert not offenders


def test_no_module_imports_another_modules_private_names():
    root = IR_DIR.parents[1]
    offenders = []
    for folder in ("graphopt", "passes", "backends", "cost_models"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                ours = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("graphopt"))
                if ours:  # the adapter modules import other libraries' private names: that is their job
                    offenders += [f"{path.relative_to(root)}: {a.name}" for a in node.names
                                  if a.name.startswith("_") and not a.name.startswith("__")
                                  and not _is_adapter_module(a.name)]
    assert not offenders


def _is_adapter_module(name: str) -> bool:
    """The one-adapter-per-library modules (``_onnxruntime``, ``_triton``, ...) are private to their package
    by name; importing the module itself is how a package reaches its adapter."""
    return name in {"_torch_private", "_onnxruntime", "_triton", "_tvm"}
