"""Datasets: sources, discovery and checks, transforms, loaders, sample data, downloads."""
