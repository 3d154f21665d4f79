"""Evaluation (not written yet): benchmarks and metrics (accuracy, pass@k, length, reflection), run tables, plots."""
