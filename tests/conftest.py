"""Shared test set-up.

With pytest's default ``prepend`` import mode this file puts ``tests/`` on
``sys.path``, so test modules in sub-folders import shared helpers
(``ir_interpreter``) by name. ``GRAPHOPT_DEBUG`` makes every ``PassManager``
verify the graph after each pass and check each pass's ``modified`` claim.
"""
import os

os.environ.setdefault("GRAPHOPT_DEBUG", "1")

# Tuning records, timings and device profiles go to a fresh folder, never the user's cache.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "GRAPHOPT_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="graphopt-cache-")
    os.environ["GRAPHOPT_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
