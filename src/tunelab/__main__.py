"""`python -m tunelab` runs the command line (what compare-methods uses for its child runs)."""

from tunelab.cli import app

app()
