"""Guard filters for ``torch.compile`` on frozen inference models.

Dynamo guards every attribute a forward reads through its submodules: their types, their
empty hook dicts, their flags, each parameter's metadata. On torchvision's MobileNetV2 that
is about 4,000 guards, checked on every call: about 0.5 ms on two CPU cores, half of what
onnxruntime takes to run the whole model at batch 1. A model compiled with graphopt's
``freeze`` holds its weights as constants already, so these guards protect little it
still reads; dropping them is the deployment trade that torch's own
``torch.compiler.skip_guard_on_all_nn_modules_unsafe`` makes, less the one flag whose
change users do expect to take effect. Guards on globals protect the code the forward ran
rather than its weights; a model whose code is frozen too can drop them
(``frozen_model_guards``), as torch's ``skip_guard_on_globals_unsafe`` does.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _torch_private


def frozen_module_guards(entries: Sequence[Any]) -> list[bool]:
    """Keep Dynamo's guards on the inputs, globals and grad mode and each module's ``training``
    flag; drop the other guards on module attributes.

    Pass it as ``torch.compile(model, backend="graphopt", options={"guard_filter_fn":
    graphopt.frozen_module_guards})``. ``model.train()``/``model.eval()``, new input shapes
    and a parameter replaced by a new tensor still recompile; replacing a submodule or adding
    a hook after the first call is not seen (recompile with ``torch.compiler.reset()``).
    """
    return [not _torch_private.guards_module_attribute(e) or _is_training_flag(e) for e in entries]


def _is_training_flag(entry: Any) -> bool:
    return entry.guard_type == "CONSTANT_MATCH" and entry.name.endswith(".training")


def frozen_model_guards(entries: Sequence[Any]) -> list[bool]:
    """``frozen_module_guards``, less the guards on globals: for a model whose code stays as it is, like
    its weights.

    Dynamo guards each global the traced code reads (builtins, library modules and their
    functions' code objects): 222 of the 239 guards ``frozen_module_guards`` keeps on HF BERT.
    Cheap in a loop, they are checked with cold caches after the model's own run has evicted
    them: on two CPU cores, about 80 µs a call against 30 without them. Reassigning a global the
    forward reads (a module-level flag, a patched function) is then not seen until
    ``torch.compiler.reset()``; inputs, grad mode and ``training`` flags are still guarded.
    """
    return [keep and not e.is_global for keep, e in zip(frozen_module_guards(entries), entries)]
