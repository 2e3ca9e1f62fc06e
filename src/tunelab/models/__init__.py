"""Where a model comes from (presets, hub ids, local folders, .gguf files) and how it is loaded."""
