"""`tunelab ui`: the local web app over a runs folder (see app.py)."""
