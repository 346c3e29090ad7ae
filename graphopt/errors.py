"""User errors: problems with what the user asked for, as opposed to bugs in graphopt.

The shells report a ``GraphoptError`` as one line that names the problem and the
fix, without a traceback; any other exception is an internal error.
"""
from __future__ import annotations


class GraphoptError(Exception):
    """Something the user can fix: a bad path, an unreadable model, an unknown name."""


class InvalidOptionError(GraphoptError, ValueError):
    """An unknown option, level or pass name, or an option value of the wrong type."""


class UnsupportedModelError(GraphoptError, ValueError):
    """An input model graphopt cannot read: not a model, or a format version it does not support."""
