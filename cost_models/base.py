"""What every cost model is: a predicted time for running one region on one backend."""
from __future__ import annotations

from typing import ClassVar

import torch

from graphopt.backends.region import Region


class CostModel:
    """Predicts the seconds one call of ``region`` takes when lowered to ``backend`` on ``device``.

    ``None`` means the model has no estimate (no measurement recorded, a backend
    it does not model); the selection policy then asks the next model.
    """

    name: ClassVar[str] = ""

    def predict(self, region: Region, backend: str, device: torch.device) -> float | None:
        raise NotImplementedError
