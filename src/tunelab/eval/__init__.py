"""Evaluation: task metrics and the code that scores a model on a dataset."""
