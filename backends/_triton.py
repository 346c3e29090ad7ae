"""The one module that touches Triton: whether it can run here, loading generated source, launching, tuning.

Triton's Python surface moves between releases (the interpreter switch, launch
options, benchmarking and ahead-of-time compile entry points), so every use of
it is here and a version change touches this file only. Triton is imported
lazily, so graphopt imports without it, and ``TRITON_INTERPRET`` is read when
it matters, not when this module is imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .base import cache_dir
from .triton_codegen import KernelSource, LaunchConfig

MATMUL_TILES: tuple[dict[str, int], ...] = (
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
)
"""The matmul tiles timed on a GPU (large square, wide, tall, small); the interpreter takes the first."""


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``), read now, as Triton does."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def unavailable(device: torch.device) -> str | None:
    """Why Triton cannot run kernels on ``device`` here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device.type != "cpu":
        return f"Triton does not target {device.type} devices"
    if not interpreting():
        return "no CUDA device and TRITON_INTERPRET is not set"
    if not language_interpreted():
        return ("TRITON_INTERPRET was set after triton.language was imported (importing torch._dynamo does): "
                "set it before anything imports triton")
    return None


def language_interpreted() -> bool:
    """Whether Triton's own library (``tl.sum``, ``tl.sigmoid``, ...) runs in the interpreter in this process.

    Triton decides it once, when ``triton.language`` is first imported: a process
    runs kernels in the interpreter or compiles them, and the flag set or unset
    later changes only the kernels it decorates, which then fail in Triton's library.
    """
    if "triton.language" not in sys.modules:
        return interpreting()
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


_LOADED: dict[tuple[str, bool], Any] = {}


def load(source: KernelSource) -> Any:
    """The ``@triton.jit`` function of a generated kernel (``load_text``)."""
    return load_text(source.name, source.text)


def load_text(name: str, text: str) -> Any:
    """The ``@triton.jit`` function ``name`` of the module ``text``, written into the cache folder and imported.

    ``triton.jit`` reads the function's source text, so the kernel must live in a real
    file. Loaded once per text and per interpreter setting (``jit`` picks its kind at
    decoration time).
    """
    if interpreting() != language_interpreted():
        raise RuntimeError("TRITON_INTERPRET changed after triton.language was imported: "
                           "kernels would fail inside Triton's library")
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    key = (digest, interpreting())
    if key not in _LOADED:
        path = cache_dir("triton") / f"{name}_{digest}.py"
        if not path.exists():
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(text)
            scratch.replace(path)
        spec = importlib.util.spec_from_file_location(f"graphopt_triton_{digest}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        _LOADED[key] = getattr(module, name)
    return _LOADED[key]


def _digest(source: KernelSource) -> str:
    return hashlib.sha256(source.text.encode()).hexdigest()[:24]


_TUNED: dict[tuple[str, int], LaunchConfig] = {}
"""The configuration timed fastest per kernel text and GPU: the identical layers of a model share one
kernel text (shapes are part of it), so they are timed once."""


class Launcher:
    """Launches one generated kernel. With several configurations, the first call on a GPU times
    each on its arguments and keeps the fastest (the interpreter takes the first); a configuration
    that does not fit the GPU (shared memory, registers) is skipped."""

    def __init__(self, source: KernelSource):
        self.kernel = load(source)
        self.digest = _digest(source)
        self.configs = source.configs
        self.chosen: LaunchConfig | None = source.configs[0] if len(source.configs) == 1 or interpreting() else None

    def __call__(self, *args: torch.Tensor) -> None:
        if self.chosen is None:
            key = (self.digest, args[0].device.index or 0)
            if key not in _TUNED:
                _TUNED[key] = self.fastest(args)
            self.chosen = _TUNED[key]
        self.launch(self.chosen, args)

    def launch(self, config: LaunchConfig, args: Sequence[torch.Tensor]) -> None:
        self.kernel[config.grid](*args, **config.constants, **config.options)

    def fastest(self, args: Sequence[torch.Tensor]) -> LaunchConfig:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        times = {}
        for k, config in enumerate(self.configs):
            try:
                times[k] = do_bench(lambda: self.launch(config, args))
            except OutOfResources:
                continue
        if not times:
            raise RuntimeError(f"no configuration of {self.kernel.__name__} fits this GPU")
        return self.configs[min(times, key=times.__getitem__)]


def compile_for(source: KernelSource, arch: int = 90) -> dict[str, Any]:
    """Compile ``source`` (its first configuration) with Triton's real compiler for ``sm_<arch>``, no GPU
    needed: what the interpreter does not check, that the text passes Triton's front end and lowers to
    machine code. Returns the stages' output by name (``"ttir"``, ``"ptx"``, ``"cubin"``, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if language_interpreted():
        raise RuntimeError("triton.language was imported under TRITON_INTERPRET=1: this process cannot compile")
    fn = load(source)
    config = source.configs[0]
    signature = dict(zip(fn.arg_names, source.arg_types))
    signature.update({name: "constexpr" for name in config.constants})
    compiled = triton.compile(ASTSource(fn, signature, dict(config.constants)),
                              target=GPUTarget("cuda", arch, 32), options=dict(config.options))
    return dict(compiled.asm)
