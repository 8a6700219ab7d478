"""Benchmarks for faithful-vit: kernels (``bench_attention``) and models (``bench_model``); results in ``results/``."""
