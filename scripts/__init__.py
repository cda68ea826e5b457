"""Developer scripts: `python -m scripts.stack` runs the local servers."""
