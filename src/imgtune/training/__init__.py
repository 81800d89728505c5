"""Training: the Trainer, its events and callbacks, metrics, feature cache, training jobs."""
