"""Launch recipes shipped with the package: hetermoe configs and the stock training script."""

import os

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))


def recipe_path(name: str) -> str:
    return os.path.join(RECIPES_DIR, name)
