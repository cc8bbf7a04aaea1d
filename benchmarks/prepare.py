"""The prepare stage on clothed synthetic photos: seconds per photo on one core, and the fitted body's quality.

    .venv/bin/python benchmarks/prepare.py [--seeds 301 302 ...] [--yaws 0 90] [--fits shipped fast]

Each subject is a synthetic person in MakeHuman's real garments (`../shared/real/makehuman`, seed-drawn
phenotype and pose), rendered at 1024 over three backgrounds: grey, a photograph (scikit-image's
"coffee", JPEG-compressed) and an RGBA image whose alpha is the person. Each photo goes through the
product's prepare stage as `pifuhd reconstruct --body` runs it (decode, person finder, crop, body fit),
once per fitter setting in --fits and person-finder setting in --finders, all in one run on one torch thread.
Per pair of settings it prints:
- seconds per photo (median wall and process CPU) for the whole stage;
- the fitted body's mean vertex error against the true body under the clothes (cm, depth-aligned);
- the spread over backgrounds: the largest symmetric mean surface distance between the bodies fitted to
  the same view over the three backgrounds (cm, each pair depth-aligned);
- gender: the share of subjects of clear gender (true < 0.35 or > 0.65) whose fitted gender is on the right
  side of 0.5.
Targets (issue 32): <= 1.5 s per photo, <= 4.0 cm vertex error, <= 2 cm across backgrounds, gender right
for 90 %.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.body.fit import FitConfig
from model.data.known_bodies import vertex_error_cm
from model.data.humans import HumanConfig, make_subject
from model.geometry import Crop, world_to_pixel
from model.person import PersonFinder, PersonFinderConfig
from model.render import View

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers
from tests.helpers import backdrop_photos, body_distance_cm, prepare_and_fit  # noqa: E402

SIZE = 1024
GARMENTS = Path(__file__).resolve().parents[2] / "shared" / "real" / "makehuman"
# Fitter settings compared side by side; "shipped" is FitConfig's defaults.
FITS = {
    "shipped": FitConfig(),
    "stop35": FitConfig(vertex_stride=5, pose_tolerance=0.0),  # the defaults before the pose stage stopped early
    "noshape": FitConfig(shape_steps=0),
    "fast": FitConfig(camera_steps=20, pose_steps=60, shape_steps=30, coverage_points=200),
}
# Person-finder settings; "shipped" is PersonFinderConfig's defaults.
FINDERS = {
    "shipped": PersonFinderConfig(threads=1),
    "one-pass": PersonFinderConfig(threads=1, refine=False),  # the landmark net once, on the detector's ROI
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[301, 302, 303, 304, 305, 306])
    parser.add_argument("--yaws", type=float, nargs="+", default=[0.0, 90.0])
    parser.add_argument("--fits", nargs="+", choices=tuple(FITS), default=list(FITS))
    parser.add_argument("--finders", nargs="+", choices=tuple(FINDERS), default=["shipped"])
    parser.add_argument("--backgrounds", nargs="+", choices=("grey", "photo", "rgba"), default=["grey", "photo", "rgba"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    finders = {name: PersonFinder(FINDERS[name]) for name in args.finders}
    settings = [(fit, finder) for fit in args.fits for finder in args.finders]
    config = HumanConfig(garments=str(GARMENTS))
    results = {f"{fit}/{finder}": {"wall": [], "cpu": [], "error": [], "spread": [], "gender": []} for fit, finder in settings}
    warm = True
    for seed in args.seeds:
        try:
            subject = make_subject(f"subject-{seed}", seed, config)
        except ValueError as exc:  # GarmentFitError: the generator refuses this subject
            print(f"{seed}: not made ({exc})")
            continue
        true_gender = subject.info["phenotype"]["gender"]
        for yaw in args.yaws:
            view, crop = View(yaw_deg=yaw), Crop.whole_square(SIZE)
            truth = world_to_pixel(view.apply(subject.body.vertices.astype(np.float64)), crop)
            pixels_per_cm = crop.pixels_per_unit * view.units_per_cm
            photos = backdrop_photos(subject, yaw, SIZE)
            if warm:  # model builds and kernel compilation, outside the timings
                for finder in finders.values():
                    prepare_and_fit(photos["grey"], finder, FitConfig(camera_steps=1, pose_steps=1, shape_steps=1))
                warm = False
            for fit_name, finder_name in settings:
                name = f"{fit_name}/{finder_name}"
                bodies, line = [], []
                for background, photo in photos.items():
                    if background not in args.backgrounds:
                        continue
                    wall, cpu = time.perf_counter(), time.process_time()
                    try:
                        fit = prepare_and_fit(photo, finders[finder_name], FITS[fit_name])
                    except Exception as exc:  # noqa: BLE001 - a failed view is reported, not fatal
                        line.append(f"{background} failed ({type(exc).__name__})")
                        continue
                    results[name]["wall"].append(time.perf_counter() - wall)
                    results[name]["cpu"].append(time.process_time() - cpu)
                    error = vertex_error_cm(fit.vertices, truth, pixels_per_cm)
                    results[name]["error"].append(error)
                    bodies.append(fit.vertices)
                    if background == "grey" and abs(true_gender - 0.5) > 0.15:
                        results[name]["gender"].append((fit.params.phenotype["gender"] > 0.5) == (true_gender > 0.5))
                    line.append(f"{background} {error:.2f} cm g {fit.params.phenotype['gender']:.2f}")
                spread = max((body_distance_cm(a, b, fit.faces, pixels_per_cm)
                              for i, a in enumerate(bodies) for b in bodies[i + 1:]), default=float("nan"))
                results[name]["spread"].append(spread)
                print(f"{seed} yaw {yaw:>3.0f} {name:16} (true g {true_gender:.2f}): {'; '.join(line)}; "
                      f"spread {spread:.2f} cm", flush=True)
    print()
    print(f"{'fit/finder':16} {'photos':>6} {'wall s':>7} {'cpu s':>6} {'error cm':>9} {'spread cm':>10} {'gender':>7}")
    for name, r in results.items():
        gender = f"{np.mean(r['gender']):.0%}" if r["gender"] else "-"
        print(f"{name:16} {len(r['wall']):>6} {np.median(r['wall']):>7.2f} {np.median(r['cpu']):>6.2f} "
              f"{np.mean(r['error']):>9.2f} {np.nanmax(r['spread']):>10.2f} {gender:>7}"
              f"   (spread mean {np.nanmean(r['spread']):.2f}; gender of {len(r['gender'])})")


if __name__ == "__main__":
    main()
