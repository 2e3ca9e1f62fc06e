"""Experiment tracking: metrics.jsonl always."""
