"""Shared test set-up.

With pytest's default ``prepend`` import mode this file puts ``tests/`` on
``sys.path``, so test modules in sub-folders import shared helpers
(``ir_interpreter``) by name. ``GRAPHOPT_DEBUG`` makes every ``PassManager``
verify the graph after each pass and check each pass's ``modified`` claim.
"""
import os

os.environ.setdefault("GRAPHOPT_DEBUG", "1")
