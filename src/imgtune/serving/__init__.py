"""Serving: the model bundle (Predictor, HTTP endpoint and batch transform come later)."""
