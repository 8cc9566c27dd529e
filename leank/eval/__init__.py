"""Evaluation: RULER metrics (``metrics``), task runners, baselines and reports."""
