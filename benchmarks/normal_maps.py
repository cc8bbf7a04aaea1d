"""Angular error of the predicted normal maps against rendered truth, front and back, per checkpoint.

    .venv/bin/python benchmarks/normal_maps.py --data DATASET [--split test] [--checkpoint C ...] [--limit N]

Each view's image is cut out over grey with its mask, as the product feeds the normal nets, and each
checkpoint's front and back maps are compared with the dataset's rendered ones inside the mask
(degrees between unit normals; the back map's truth is the far surface's). The shipped model is
always measured first, as the baseline of the same run. Issue 31 asks for this on the validation
statues (`pifuhd data scans ... --fixed-yaws`), where the normal nets meet real surfaces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def angular_errors(predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Degrees between (3, S, S) normal maps at the pixels of the (S, S) bool mask."""
    p, t = predicted[:, mask], truth[:, mask]
    p = p / np.maximum(np.linalg.norm(p, axis=0), 1e-6)
    t = t / np.maximum(np.linalg.norm(t, axis=0), 1e-6)
    return np.degrees(np.arccos(np.clip((p * t).sum(0), -1.0, 1.0)))


def main() -> None:
    import torch

    from model.network.checkpoint import load_checkpoint
    from pipelines.common.checkpoints import SHIPPED_CHECKPOINT, fetch_checkpoint
    from pipelines.common.dataset import iter_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="checkpoints measured after the shipped one")
    parser.add_argument("--limit", type=int, default=None, help="at most this many views")
    args = parser.parse_args()
    nets = {name: load_checkpoint(fetch_checkpoint(name)).eval() for name in [str(SHIPPED_CHECKPOINT), *args.checkpoint]}
    errors = {name: {"front": [], "back": []} for name in nets}
    views = 0
    for batch in iter_batches(args.data, args.split, batch_size=4):
        masks = batch["mask_512"][:, 0] > 0.5
        image = torch.from_numpy(batch["image_512"] * (batch["mask_512"] > 0.5))  # over grey, as the product
        for name, net in nets.items():
            with torch.no_grad():
                front, back = (n.numpy() for n in net.predict_normals(image))
            for i, mask in enumerate(masks):
                errors[name]["front"].append(angular_errors(front[i], batch["normal_front_512"][i], mask).mean())
                errors[name]["back"].append(angular_errors(back[i], batch["normal_back_512"][i], mask).mean())
        views += len(masks)
        if args.limit and views >= args.limit:
            break
    print(f"{views} views of {args.data} ({args.split}); mean angular error inside the mask, degrees")
    print(f"{'checkpoint':60s} {'front':>7s} {'back':>7s}")
    for name, e in errors.items():
        label = ("(shipped) " if name == str(SHIPPED_CHECKPOINT) else "") + name
        print(f"{label[-60:]:60s} {np.mean(e['front']):7.2f} {np.mean(e['back']):7.2f}")


if __name__ == "__main__":
    main()
