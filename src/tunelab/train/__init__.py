"""The single training loop, its optimiser and schedule, checkpoints and resume."""
