"""Models that choose among lowerings (installed as ``graphopt.cost_models``)."""
