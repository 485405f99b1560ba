"""Small data shipped with the package (see README.md in this folder)."""

import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def demo_corpus_path() -> str:
    """Path of the bundled English text the demo and the recipes train on."""
    return os.path.join(DATA_DIR, "demo_corpus.txt")
