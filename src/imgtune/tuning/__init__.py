"""Hyperparameter tuning jobs on Ray Tune (imgtune.tuning.job) over search spaces (imgtune.tuning.space)."""
