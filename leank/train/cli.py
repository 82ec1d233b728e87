"""``leank train RECIPE``: run the two-stage mask training of a YAML recipe."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="learn a K-channel mask (two-stage LeanK training)",
        description="Learn a K-channel mask from a YAML recipe (see masks/recipes/). "
                    "Single GPU: `leank train RECIPE`; long contexts over several GPUs: "
                    "`torchrun --nproc-per-node N -m leank.cli train RECIPE` (FSDP2).",
    )
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("--model", help="override the recipe's model (HF id or local directory)")
    p.add_argument("--output", help="override the output mask path (.safetensors)")
    p.add_argument("--ratio", type=float, help="override the target K sparsity")
    p.add_argument("--stage1-steps", type=int, dest="stage1_steps", help="override stage-1 steps")
    p.add_argument("--stage2-steps", type=int, dest="stage2_steps", help="override stage-2 steps")
    p.add_argument("--checkpoint-dir", dest="checkpoint_dir", help="override the checkpoint directory")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--max-steps", type=_positive_int, help="stop (with a checkpoint) after this global step")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .loop import train
    from .recipe import load_recipe

    overrides = {k: getattr(args, k) for k in ("model", "output", "ratio", "stage1_steps", "stage2_steps",
                                               "checkpoint_dir")}
    recipe = load_recipe(args.recipe, **overrides)
    mask = train(recipe, device=args.device, max_steps=args.max_steps, resume=not args.no_resume)
    if mask is None:
        logger.info("stopped at --max-steps; rerun the same command to resume")
    else:
        logger.info("mask: %r", mask)
    return 0
