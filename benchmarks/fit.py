"""Body fit: seconds per fit and per step on one core, and accuracy, on rendered anny bodies.

    .venv/bin/python benchmarks/fit.py [--seeds 201 202 203 204 205] [--yaws 0 90 180] [--size 512]
    .venv/bin/python benchmarks/fit.py --clothed [--family crouch] [--lifter FILE] [--seeds ...] [--yaws 0 90]

Each case draws a body (the generator's phenotype and pose samplers, families in turn), renders it
at `--size`, fits it from the true landmarks, world landmarks and render mask with torch on one
thread, and prints: wall and CPU seconds per fit (process CPU time: on a shared machine wall time
also counts other processes' turns), seconds per step, mean vertex error after depth alignment
(cm), landmark error (fraction of the image height) and mask IoU. Targets: < 5 s per fit
on one core at yaw 0, < 2.5 cm at yaw 0, < 0.02 of the image height.

--clothed: as the product fits a photo. Clothed synthetic subjects (`rendered_subject`, of --family
if given, else each seed's own) go through the person finder, and the body is fitted from its
landmarks and mask twice, following its world landmarks (world_source "given") and following the
lifter (`model.body.lifter`, --lifter FILE instead of the shipped one: e.g. a `pifuhd train-lifter
--families` file that never saw --family). Prints each view's vertex error of the body under the
clothes (cm, depth aligned) for both, and their means.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.body import FitConfig, UnusableLandmarks, fit_body
from model.data.known_bodies import rendered_body, rendered_subject, vertex_error_cm
from model.data.humans import POSE_FAMILIES


def clothed(args) -> None:
    """The --clothed comparison (module docstring)."""
    from model.body import lifter
    from model.data.humans import make_subject
    from model.render import View
    from model.person import PersonFinder
    from model.geometry import Crop, world_to_pixel

    if args.lifter:
        lifter.load_lifter.cache_clear()
        shipped = lifter.load_lifter(args.lifter)
        lifter.load_lifter = lambda path=None: shipped  # what lift_world_landmarks reads
    finder = PersonFinder()
    sources = ("given", "lifter")
    errors = {source: [] for source in sources}
    print(f"{'seed':>5} {'family':8} {'yaw':>4} " + " ".join(f"{source + ' cm':>10}" for source in sources))
    for seed in args.seeds:
        body = make_subject(f"subject-{seed}", seed, family=args.family).parts[0]  # anny's topology, dressed
        for yaw in args.yaws:
            render = rendered_subject(seed, yaw, args.size, family=args.family)
            truth = world_to_pixel(View(yaw_deg=yaw).apply(body.vertices.astype(np.float64)), Crop.whole_square(args.size))
            people = finder.find(render.image)
            if not people:
                print(f"{seed:>5} {render.family:8} {yaw:>4.0f} no person found")
                continue
            person, row = people[0], []
            try:
                for source in sources:
                    fit = fit_body(person.landmarks, (args.size, args.size), mask=person.mask,
                                   world_landmarks=person.world_landmarks, config=FitConfig(world_source=source))
                    row.append(vertex_error_cm(fit.vertices, truth, render.pixels_per_cm))
            except UnusableLandmarks as exc:
                print(f"{seed:>5} {render.family:8} {yaw:>4.0f} not fitted: {exc}")
                continue
            for source, error in zip(sources, row):
                errors[source].append(error)
            print(f"{seed:>5} {render.family:8} {yaw:>4.0f} " + " ".join(f"{error:>10.2f}" for error in row), flush=True)
    wins = sum(b < a for a, b in zip(errors["given"], errors["lifter"]))
    print(f"{len(errors['given'])} views: " + "; ".join(
        f"{source} {np.mean(values):.2f} cm mean, {np.median(values):.2f} median" for source, values in errors.items())
        + f"; the lifter better on {wins}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[201, 202, 203, 204, 205])
    parser.add_argument("--yaws", type=float, nargs="+", default=[0.0, 90.0, 180.0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--clothed", action="store_true", help="clothed subjects through the person finder, world sources compared")
    parser.add_argument("--family", help="--clothed: every subject of this pose family")
    parser.add_argument("--lifter", help="--clothed: this lifter file instead of the shipped one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.clothed:
        clothed(args)
        return
    config = FitConfig(world_source="given")  # the true world landmarks: the fitter's own accuracy

    warm = rendered_body(args.seeds[0], "stand", 0.0, args.size)  # model build and kernel compilation
    fit_body(warm.landmarks, (args.size, args.size), mask=warm.mask, config=FitConfig(camera_steps=1, pose_steps=1, shape_steps=1))

    rows = []
    print(f"{'seed':>5} {'family':8} {'yaw':>4} {'wall s':>7} {'cpu s':>6} {'ms/step':>8} {'cm':>5} {'lm/H':>6} {'IoU':>5}")
    for i, seed in enumerate(args.seeds):
        family = POSE_FAMILIES[i % len(POSE_FAMILIES)]
        for yaw in args.yaws:
            body = rendered_body(seed, family, yaw, args.size)
            wall, cpu = time.perf_counter(), time.process_time()
            fit = fit_body(body.landmarks, (args.size, args.size), mask=body.mask, world_landmarks=body.world_landmarks, config=config)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            error = vertex_error_cm(fit.vertices, body.vertices, body.pixels_per_cm)
            rows.append((yaw, wall, cpu, error, fit.landmark_error, fit.mask_iou))
            print(f"{seed:>5} {family:8} {yaw:>4.0f} {wall:>7.2f} {cpu:>6.2f} {1000 * cpu / fit.steps:>8.1f} "
                  f"{error:>5.2f} {fit.landmark_error:>6.4f} {fit.mask_iou:>5.3f}", flush=True)
    table = np.array(rows, dtype=np.float64)
    for yaw in args.yaws:
        sel = table[table[:, 0] == yaw]
        print(f"yaw {yaw:>3.0f}: median wall {np.median(sel[:, 1]):.2f} s, cpu {np.median(sel[:, 2]):.2f} s per fit "
              f"(target < 5 s at yaw 0); vertex error mean {sel[:, 3].mean():.2f} cm (target < 2.5 at yaw 0), "
              f"max {sel[:, 3].max():.2f}; landmark error max {sel[:, 4].max():.4f} of H (target < 0.02); "
              f"IoU mean {sel[:, 5].mean():.3f}")
    print(f"{config.camera_steps + config.pose_steps + config.shape_steps} steps per fit")


if __name__ == "__main__":
    main()
