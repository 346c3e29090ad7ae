"""``GraphState``: the state an emitted torch module keeps across calls, in explicitly keyed slots.

Step caching reuses a block's output from an earlier sampling step; that output
has to live somewhere between calls. It lives here, on the module (its
``graphopt_state`` submodule), so two emitted modules never share it and no
global holds it. ``state_load`` / ``state_store`` nodes of the IR become calls
of ``load`` / ``store``. Slots are keyed by the node's ``key`` and the active
branch, so the two passes of classifier-free guidance, run one after the
other, each keep their own (``with module.graphopt_state.branch("uncond"):``).

``reset()`` empties every slot: call it between two generations (a new
prompt, a new seed), as a sampler resets its scheduler.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class GraphState(torch.nn.Module):
    """Tensors kept across calls of one emitted module, by (branch, key)."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: dict[str, torch.Tensor] = {}
        self.memories: dict[str, Any] = {}
        self.active = ""

    def load(self, key: str, default: torch.Tensor) -> torch.Tensor:
        return self.slots.get(self._slot(key), default)

    def store(self, key: str, value: torch.Tensor) -> torch.Tensor:
        self.slots[self._slot(key)] = value
        return value

    def keep(self, key: str, make: Callable[[], Any]) -> Any:
        """A structured memory (a step cache's residuals and counters) in slot ``key`` of the active
        branch, made by ``make`` on first use; ``reset`` forgets it like any slot."""
        slot = self._slot(key)
        if slot not in self.memories:
            self.memories[slot] = make()
        return self.memories[slot]

    def memories_of(self, key: str) -> list[Any]:
        """The structured memories kept at ``key``, one per branch that made one."""
        return [m for slot, m in self.memories.items() if slot == key or slot.endswith(f"/{key}")]

    def forget(self, prefix: str) -> None:
        """Forget the active branch's slots whose keys start with ``prefix``."""
        start = self._slot(prefix)
        for table in (self.slots, self.memories):
            for slot in [s for s in table if s.startswith(start)]:
                del table[slot]

    def reset(self) -> None:
        """Forget every slot of every branch."""
        self.slots.clear()
        self.memories.clear()

    @contextmanager
    def branch(self, name: str) -> Iterator[GraphState]:
        """Calls inside the block read and write the slots of branch ``name``."""
        previous, self.active = self.active, name
        try:
            yield self
        finally:
            self.active = previous

    def _slot(self, key: str) -> str:
        return f"{self.active}/{key}" if self.active else key

    def extra_repr(self) -> str:
        return f"{len(self.slots) + len(self.memories)} slots" + (f", branch {self.active!r}" if self.active else "")
