"""Data: sources, formats, chat templates and loss masks, validation, splits, batching and packing."""
