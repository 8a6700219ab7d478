"""Datasets: the built-in spurious-correlation benchmark and loaders for the paper's datasets."""
