"""`python -m imgtune` is the `imgtune` command."""

from imgtune.cli import app

app()
