"""Benchmark outputs are written whole or not at all: to `{path}.tmp`, then renamed over `path`
(a run that fails half-way leaves the previous file as it was)."""

import os


def write_text(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(temporary, path)


def save_png(figure, path: str) -> None:
    """A matplotlib figure as a PNG at `path`."""
    temporary = path + ".tmp"
    figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    os.replace(temporary, path)
