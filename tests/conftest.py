"""Shared test set-up.

With pytest's default ``prepend`` import mode this file puts ``tests/`` on
``sys.path``, so test modules in sub-folders import shared helpers
(``ir_interpreter``) by name. ``GRAPHOPT_DEBUG`` makes every ``PassManager``
verify the graph after each pass and check each pass's ``modified`` claim.
"""
import os

os.environ.setdefault("GRAPHOPT_DEBUG", "1")

# Tuning records, timings and device profiles go to a fresh folder, never the user's cache.
import tempfile  # noqa: E402

os.environ.setdefault("GRAPHOPT_CACHE_DIR", tempfile.mkdtemp(prefix="graphopt-cache-"))
