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

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class GraphState(torch.nn.Module):
    """Tensors kept across calls of one emitted module, by (branch, key)."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: dict[str, torch.Tensor] = {}
        self.active = ""

    def load(self, key: str, default: torch.Tensor) -> torch.Tensor:
        return self.slots.get(self._slot(key), default)

    def store(self, key: str, value: torch.Tensor) -> torch.Tensor:
        self.slots[self._slot(key)] = value
        return value

    def reset(self) -> None:
        """Forget every slot of every branch."""
        self.slots.clear()

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
        return f"{len(self.slots)} slots" + (f", branch {self.active!r}" if self.active else "")
