"""Studies that use lars_tf and the training app (run as python -m experiments.NAME)."""
