"""tunelab: fine-tune large language models end to end, with the evidence that it helped."""

__version__ = "0.1.0"
