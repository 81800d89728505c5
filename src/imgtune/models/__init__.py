"""Models: create_model, weights."""
