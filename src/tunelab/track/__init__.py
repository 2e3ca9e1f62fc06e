"""Experiment tracking: metrics.jsonl always; TensorBoard, W&B and MLflow when `track.to` names them."""
