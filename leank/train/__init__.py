"""Two-stage LeanK mask training (``leank train RECIPE``).

    from leank.train import load_recipe, train
    mask = train(load_recipe("masks/recipes/llama-3.1-8b-instruct.yaml"))

Importing this package loads no model and patches nothing.
"""

from __future__ import annotations

from .recipe import TrainRecipe, load_recipe, recipe_from_dict

__all__ = ["TrainRecipe", "load_recipe", "recipe_from_dict", "train", "Trainer"]


def __getattr__(name: str):
    if name in ("train", "Trainer"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'leank.train' has no attribute {name!r}")
