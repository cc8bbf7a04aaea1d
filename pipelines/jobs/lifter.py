"""`pifuhd train-lifter`: train the body fit's 2D -> depth lifter (`model.body.lifter`) in this process.

About 80 minutes of one CPU (the shipped file: 6.9 min for the 16k poses, 0.3-0.4 s per finder view
for 12000 views, 3 min for the 12k steps, on the 2-core machine with other work beside it); no Ray: the model is a 0.3 M-parameter MLP. The file it writes is what `model/weights/depth-lifter.safetensors`
ships, its recipe in the header.
"""

from __future__ import annotations

import time

from model.data.humans import POSE_FAMILIES
from pipelines.common.exit_codes import build_config
from pipelines.common.uris import uri_argument


def _recipe(args):
    from model.training.lifter import LifterRecipe

    return build_config(LifterRecipe, family_poses=args.family_poses, uniform_poses=args.uniform_poses,
                        families=tuple(args.families), finder_views=args.finder_views,
                        finder_share=args.finder_share if args.finder_views else 0.0, steps=args.steps, seed=args.seed)


def _train(args) -> int:
    from model.training.lifter import finder_pairs, lifter_bytes, train_lifter, training_poses
    from pipelines.common import storage

    recipe = _recipe(args)
    start = time.perf_counter()
    points = training_poses(recipe)
    print(f"{len(points)} poses in {time.perf_counter() - start:.0f} s", flush=True)
    finder = finder_pairs(recipe) if recipe.finder_views else None
    if finder is not None:
        print(f"{len(finder[0])} of {recipe.finder_views} finder views usable, {time.perf_counter() - start:.0f} s", flush=True)

    def log(step: int, loss: float) -> None:
        print(f"step {step}: depth L1 {loss:.4f} (of the 2D spread), {time.perf_counter() - start:.0f} s", flush=True)

    net = train_lifter(points, recipe, finder, log=log)
    storage.write_bytes_atomic(args.output, lifter_bytes(net, recipe))
    print(f"wrote {args.output}")
    return 0


def register_cli(commands) -> None:
    """Add `pifuhd train-lifter` to the command line."""
    parser = commands.add_parser(
        "train-lifter",
        help="train the body fit's 2D -> depth lifter on the synthetic generator's poses and the person finder's "
        "landmarks on clothed renders (one CPU, about 80 min)",
        description="Train model.body.lifter: an MLP giving each body landmark's depth from the 2D landmarks, "
        "which the body fit follows (FitConfig.world_source = 'lifter'). Poses: the generator's families and as many "
        "with every joint uniform within its limits, seen from random orthographic views; and the person finder's "
        "own landmarks on clothed renders of the families, with their true depths.",
    )
    parser.add_argument("-o", "--output", required=True, type=uri_argument, help="the .safetensors file to write")
    parser.add_argument("--family-poses", type=int, default=8000, help="poses of the generator's five families")
    parser.add_argument("--uniform-poses", type=int, default=8000, help="poses with every joint uniform within its limits")
    parser.add_argument("--families", nargs="+", choices=POSE_FAMILIES, default=list(POSE_FAMILIES),
                        help="the families' poses drawn (leave one out to measure how the lifter does on it)")
    parser.add_argument("--finder-views", type=int, default=12000,
                        help="clothed renders seen by the person finder, its landmarks with the true depths (0: none)")
    parser.add_argument("--finder-share", type=float, default=0.5, help="their share of each batch")
    parser.add_argument("--steps", type=int, default=12_000, help="Adam steps of 512 random views")
    parser.add_argument("--seed", type=int, default=0, help="fixes the weights and the views")
    parser.set_defaults(handler=_train, config=_recipe)
