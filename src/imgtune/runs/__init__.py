"""The composition root: one job lifecycle (lifecycle.py), the plugins each job gets (plugins.py), and every kind
of run built from them: a training job (train.py), a tuning job (tune.py), the pipeline (pipeline.py) and the
evaluation of a finished job (evaluate.py). Only this package (and the CLI above it) knows all the others."""
