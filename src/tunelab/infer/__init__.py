"""Inference: generate, chat, merge, serve."""
