"""`pifuhd train-lifter`: train the body fit's 2D -> depth lifter (`model.body.lifter`) in this process.

About 80 minutes of one CPU (the shipped file: 6.9 min for the 16k poses, 0.3-0.4 s per finder view
for 12000 views, 3 min for the 12k steps, on the 2-core machine with other work beside it); no Ray: the model is a 0.3 M-parameter MLP. The file it writes is what `model/weights/depth-lifter.safetensors`
ships, its recipe in the header.
"""

from __future__ import annotations

import time

from model.data.humans import POSE_FAMILIES
from model.training.config import LifterRecipe
from pipelines.common.exit_codes import build_config
from pipelines.common.options import config_option, config_values
from pipelines.common.uris import uri_argument


def _recipe(args):
    fields = config_values(args, LifterRecipe)
    if not args.finder_views:  # no finder views: none of the batch is theirs
        fields["finder_share"] = 0.0
    return build_config(LifterRecipe, **fields)


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
    recipe = LifterRecipe
    config_option(parser, "--family-poses", recipe, "family_poses", help="poses of the generator's five families")
    config_option(parser, "--uniform-poses", recipe, "uniform_poses", help="poses with every joint uniform within its limits")
    config_option(parser, "--families", recipe, "families", nargs="+", choices=POSE_FAMILIES,
                  help="the families' poses drawn (leave one out to measure how the lifter does on it)")
    config_option(parser, "--finder-views", recipe, "finder_views",
                  help="clothed renders seen by the person finder, its landmarks with the true depths (0: none)")
    config_option(parser, "--finder-share", recipe, "finder_share", help="their share of each batch")
    config_option(parser, "--steps", recipe, "steps", help="Adam steps of 512 random views")
    config_option(parser, "--seed", recipe, "seed", help="fixes the weights and the views")
    parser.set_defaults(handler=_train, config=_recipe)
