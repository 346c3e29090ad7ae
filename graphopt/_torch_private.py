"""The one adapter over torch's private APIs (torch._dynamo, torch._functorch, torch._decomp).

Everything else in graphopt uses public torch only, so a torch upgrade that moves
a private API breaks this file and nothing else.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

# ============================================================================
# AOTAutograd for the torch.compile backend (owner: graphopt/compile_backend.py)
# ============================================================================

GraphCompiler = Callable[[torch.fx.GraphModule, Sequence[Any]], Callable[..., Any]]


def aot_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, fw_compiler: GraphCompiler,
                bw_compiler: GraphCompiler, inference_compiler: GraphCompiler) -> Callable[..., Any]:
    """Lower a Dynamo graph to core ATen with AOTAutograd and hand its graphs to the compilers.

    AOTAutograd functionalizes the graph, applies the core ATen decompositions and,
    when gradients are needed, splits it into a forward and a backward graph; each
    compiler receives one ATen ``GraphModule`` with flat tensor inputs and returns
    the callable that runs it.
    """
    from torch._dynamo.backends.common import aot_autograd

    backend = aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                           inference_compiler=inference_compiler, decompositions=aot_decompositions())
    return backend(gm, example_inputs)


def aot_decompositions() -> dict[Any, Callable[..., Any]]:
    """The core ATen decompositions, less those that are wrong under autograd.

    The decomposition of ``_scaled_dot_product_flash_attention_for_cpu`` returns the
    attention weights where the op returns the logsumexp its backward reads, so
    gradients through it would be wrong (inductor excludes it for the same reason).
    """
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions().items())
    table.pop(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, None)
    return table


def frozen_input_indices() -> list[int]:
    """Inputs of the graph AOTAutograd is compiling that are the module's parameters and buffers and that
    the graph neither mutates nor returns an alias of: what inductor's freezing inlines as constants.

    With Dynamo's inlined ``nn.Module``s the parameters reach the graph as inputs; Dynamo marks
    them as static inputs in the forward metadata. Empty outside a torch.compile compilation.
    """
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    meta = None if context is None else context.fw_metadata
    if meta is None:
        return []
    aliased = {out.base_idx for out in meta.output_info if out.base_idx is not None}
    return [i for i in meta.static_input_indices
            if i not in aliased and not (meta.input_info[i].mutates_data or meta.input_info[i].mutates_metadata)]


def reruns_alike(gm: torch.fx.GraphModule) -> bool:
    """Whether running ``gm`` twice on the same inputs computes the same and changes nothing: no op in it
    mutates an argument or draws random numbers (so a second run may check the first). Attention ops are
    tagged random for their dropout; with ``dropout_p`` 0 they are not."""
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target._schema.is_mutable:
            return False
        if torch.Tag.nondeterministic_seeded in target.tags:
            arguments = {a.name: a.default_value if a.has_default_value() else None for a in target._schema.arguments}
            arguments.update(zip(arguments, node.args), **node.kwargs)
            if arguments.get("dropout_p", 1) != 0:
                return False
    return True


def guards_module_attribute(entry: Any) -> bool:
    """Whether a Dynamo guard (a ``guard_filter_fn`` entry) checks something reached through an
    ``nn.Module``'s attributes: a submodule, its flags, hooks or parameters."""
    guard = entry.orig_guard
    return guard is not None and guard.source is not None and guard.source.is_unspecialized_nn_module()


def boxed(fn: Callable[..., Any]) -> Callable[[list[Any]], Any]:
    """Give ``fn`` AOTAutograd's boxed calling convention (one list of arguments it may free)."""
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(fn)


def outside_fake_mode() -> AbstractContextManager[Any]:
    """Suspend the fake-tensor mode AOTAutograd keeps active while it calls a compiler.

    Inside it, tensors created by graphopt (folded constants, emitted buffers) are real.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def outside_dispatch_modes() -> AbstractContextManager[Any]:
    """Suspend the Python dispatch modes active around a compiled graph's call.

    AOTAutograd wraps a graph's first call in a mode that checks custom ops for aliasing; a
    compilation that runs then (graphopt's on-first-call freezing) would trace and time every op
    through it, and inductor's own functionalization fails under it.
    """
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


# ============================================================================
# torch front end and emitter (owner: graphopt/frontends/torch.py, graphopt/emitters/torch.py)
# ============================================================================

def sym_expr(value: Any) -> Any:
    """The sympy expression behind a ``SymInt``/``SymFloat``/``SymBool`` (``s0``, ``2*s0``)."""
    return value.node.expr


def propagate_fake_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fill ``node.meta["val"]`` of a graph that lacks it by running it on fake copies of the inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*example_inputs)


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """pytree flattening: the leaves of ``tree`` and the ``TreeSpec`` that rebuilds it."""
    from torch.utils import _pytree

    return _pytree.tree_flatten(tree)


def tree_unflatten(leaves: Sequence[Any], spec: Any) -> Any:
    from torch.utils import _pytree

    return _pytree.tree_unflatten(list(leaves), spec)


def is_op_overload(target: Any) -> bool:
    """Whether an fx call target is an ATen-style ``OpOverload`` (``aten.add.Tensor``)."""
    return isinstance(target, torch._ops.OpOverload)


def schema_arguments(op: Any) -> list[Any]:
    """The declared arguments of an ``OpOverload`` (``name``, ``kwarg_only``, defaults)."""
    return list(op._schema.arguments)


# ============================================================================
# inductor as a region backend (owner: backends/torch.py)
# ============================================================================

def inductor_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable[..., Any]:
    """Compile an fx graph of torch calls with inductor (AOTAutograd traces it to ATen first), no Dynamo.

    Called from inside graphopt's own torch.compile backend, it must not see the outer
    trace: its shape guards would land in Dynamo's guards for the user's graph.
    """
    from torch._guards import tracing
    from torch._inductor.compile_fx import compile_fx

    with tracing(None):
        return compile_fx(gm, list(example_inputs))


def compile_option_error(error: Exception) -> Exception:
    """``error`` (an ``InvalidOptionError``) as an exception torch.compile raises to the user as it is.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed`` except ``ShortenTraceback``
    (torch/_dynamo/output_graph.py, ``_call_user_compiler``), so the error also derives from it.
    """
    from torch._dynamo.exc import ShortenTraceback

    from .errors import InvalidOptionError

    class CompileOptionError(ShortenTraceback, InvalidOptionError):
        def __init__(self, message: str):
            super().__init__(message, first_useful_frame=None)

    CompileOptionError.__name__ = CompileOptionError.__qualname__ = "InvalidOptionError"
    CompileOptionError.__module__ = "graphopt.errors"
    return CompileOptionError(str(error))


def export_failure_kind(error: BaseException) -> str | None:
    """What kind of user problem made ``torch.export`` fail, if any: ``"data-dependent"`` (control flow or
    shapes that depend on tensor values), ``"export"`` (torch.export's ``UserError``: e.g. a dynamic-shape
    spec the model contradicts), else ``None``. Follows the chain of causes."""
    from torch._dynamo.exc import UserError
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException)):
            return "data-dependent"
        if isinstance(error, UserError):
            return "export"
        if isinstance(error, TypeError) and "SymInt" in str(error):
            return "data-dependent"  # a size read from tensor values used as a Python value (hashed, in a set)
        error = error.__cause__ or error.__context__
    return None


# ============================================================================
# Step caching under torch.compile (owner: passes/step_cache/runtime.py)
# ============================================================================


def traced_around(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Dynamo runs ``fn`` itself eagerly (its host-side decisions never break a graph) but still traces
    and compiles the modules it calls, each whole. The frame is skipped by its code object, in C:
    ``disable(recursive=False)`` sends every call through Dynamo's Python frame callback (0.5 ms a call
    on 2 CPU cores, 15 % of a cached image-DiT sampling run)."""
    from torch._dynamo.decorators import skip

    return skip(fn)


def host_side(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Dynamo runs ``fn`` and everything it calls eagerly, tracing none of it: host-side decisions that
    call no module (numpy interpolation, Python bookkeeping) would only break graphs there."""
    return torch._dynamo.disable(fn, recursive=True)


# ============================================================================
# Attention with its log-sum-exp (owner: passes/sparse_attention/kernels.py)
# ============================================================================

def attention_with_logsumexp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``softmax(q kᵀ · scale) v`` and the log-sum-exp of each row's scores (``[..., rows]``), from ATen's
    CPU flash kernel, which returns both; None where that kernel does not run (other devices, dtypes).
    Two attentions over disjoint keys merge exactly through their log-sum-exps."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or q.dim() != 4:
        return None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
    return out, lse
