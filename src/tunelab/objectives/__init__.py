"""Training objectives: functions from a model and a batch to a loss."""
