"""Lowerings of IR regions to code generators (installed as ``graphopt.backends``)."""
