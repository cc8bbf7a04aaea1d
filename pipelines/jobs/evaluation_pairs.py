"""What `pifuhd evaluate` compares: the pairs of a prediction and its ground truth, in each mode.

    checkpoint  a dataset's views of the --split subjects (`checkpoint_items`), reconstructed by the job
    folder      a folder of meshes, paired with the dataset's ground truth by file-name stem (`folder_items`)
    manifest    a bulk job's output: each input's mesh by its input's stem (`manifest_items`)

An item is a dict: key, subject_id, gt_uri, view, and pred_uri where there is one; one that
cannot be paired carries error_class and error_message and becomes a failed result row.
"""

from __future__ import annotations

import logging
import os
import re

from pipelines.common import storage

log = logging.getLogger(__name__)


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")


MESH_SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".off", ".stl")


BULK_SUFFIX = re.compile(r"-[0-9a-f]{10}$")


class MissingPrediction(Exception):
    """A ground-truth mesh has no prediction to compare with."""


class EmptyPrediction(Exception):
    """The prediction has no triangles (the network found no surface)."""


class MissingGroundTruth(Exception):
    """A dataset row's subject has no ground-truth mesh."""


def is_dir(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.isdir(path)


def exists(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.exists(path)


def detect_mode(pred: str | None) -> str:
    """checkpoint | manifest | folder, from what `pred` is (None: the shipped checkpoint)."""
    if pred is None or pred == "shipped":
        return "checkpoint"
    if pred.lower().endswith(CHECKPOINT_SUFFIXES) and not is_dir(pred):
        return "checkpoint"
    if not is_dir(pred):
        raise FileNotFoundError(f"--pred {pred}: not a checkpoint file, a mesh folder or a bulk output folder")
    if is_dir(storage.join(pred, "manifest")):
        return "manifest"
    return "folder"


def is_dataset(uri: str) -> bool:
    """Whether `uri` is a dataset root (`pifuhd data ...` output) rather than a folder of meshes."""
    join = storage.join
    return exists(join(uri, "dataset.json")) or is_dir(join(uri, "shards"))


def mesh_stem(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[0]


def list_meshes(folder: str) -> dict[str, str]:
    """stem -> mesh URI of every mesh file under `folder` (recursive; first of duplicate stems)."""
    fs, path = storage.filesystem(folder)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{folder}: no such folder")
    found: dict[str, str] = {}
    for file in sorted(fs.find(path)):
        if not file.lower().endswith(MESH_SUFFIXES):
            continue
        uri = storage.full_uri(fs, file)
        stem = mesh_stem(uri)
        if stem in found:
            log.warning("two meshes named %s: using %s, ignoring %s", stem, found[stem], uri)
            continue
        found[stem] = uri
    return found


def ground_truth_meshes(gt: str, split: str) -> dict[str, str]:
    """stem (subject id) -> GT mesh URI: a folder of meshes, or a dataset's `meshes/` limited to
    the subjects of `split` ("all": every subject) as its card lists them."""
    if not is_dataset(gt):
        return list_meshes(gt)
    from pipelines.common.dataset import read_card

    meshes = list_meshes(storage.join(gt, "meshes"))
    card = read_card(gt) or {}
    subjects = card.get("splits", {}).get("subjects", {})
    if split == "all" or not subjects:
        return meshes
    wanted = set(subjects.get(split, []))
    return {k: v for k, v in meshes.items() if k in wanted}


def base_item(key: str, subject_id: str, gt_uri: str | None, view: int | None = None) -> dict:
    return {"key": key, "subject_id": subject_id, "view": view, "gt_uri": gt_uri, "pred_uri": None, "preview_uri": None}


def failed_item(item: dict, error_class: str, message: str) -> dict:
    return {**item, "kind": "failed", "error_class": error_class, "error_message": message}


def folder_items(pred: str, gt_meshes: dict[str, str]) -> tuple[list[dict], int]:
    """(one item per GT mesh, number of predictions without a GT) pairing by file-name stem."""
    predictions = list_meshes(pred)
    # Bulk outputs are named STEM-<hash of the input URI>: accept those too.
    aliases: dict[str, str] = {}
    for stem, uri in predictions.items():
        short = BULK_SUFFIX.sub("", stem)
        if short != stem:
            aliases.setdefault(short, uri)
    items, used = [], set()
    for stem, gt_uri in sorted(gt_meshes.items()):
        item = base_item(stem, stem, gt_uri)
        uri = predictions.get(stem) or aliases.get(stem)
        if uri is None:
            items.append(failed_item(item, MissingPrediction.__name__, f"no mesh named {stem}.* under {pred}"))
            continue
        used.add(uri)
        items.append({**item, "kind": "pair", "pred_uri": uri})
    return items, len(set(predictions.values()) - used)


def text_or_none(value) -> str | None:
    """A manifest cell as a string, None for missing (pandas turns missing strings into NaN)."""
    return value if isinstance(value, str) and value else None


def manifest_items(output: str, gt_meshes: dict[str, str]) -> tuple[list[dict], int]:
    """(one item per GT mesh, manifest inputs without a GT) pairing the latest manifest row of
    each input with the GT mesh of the input's file-name stem."""
    from pipelines.common.formats import read_manifest

    manifest = read_manifest(output)
    latest: dict[str, dict] = {}
    if len(manifest):
        manifest = manifest.sort_values("finished_at", kind="stable")
        for row in manifest.to_dict("records"):
            stem = mesh_stem(str(row["input_uri"]))
            if stem in latest and latest[stem]["input_uri"] != row["input_uri"]:
                log.warning("inputs %s and %s share the stem %s: using the latest", latest[stem]["input_uri"], row["input_uri"], stem)
            latest[stem] = row
    items = []
    for stem, gt_uri in sorted(gt_meshes.items()):
        item = base_item(stem, stem, gt_uri)
        row = latest.get(stem)
        if row is None:
            items.append(failed_item(item, MissingPrediction.__name__, f"no manifest row for an input named {stem}.* in {output}"))
            continue
        item.update(pred_uri=text_or_none(row.get("mesh_uri")), preview_uri=text_or_none(row.get("preview_uri")))
        if row["status"] not in ("ok", "skipped"):
            items.append(failed_item(item, text_or_none(row.get("error_class")) or "ReconstructionFailed",
                                      f"reconstruction {row['status']}: {text_or_none(row.get('error_message')) or ''}"))
            continue
        items.append({**item, "kind": "pair"})
    return items, len(set(latest) - set(gt_meshes))


def checkpoint_items(dataset: str, split: str) -> list[dict]:
    """One item per stored view of the split: where its row is, and its subject's GT mesh."""
    from pipelines.common import dataset as fmt

    uri = fmt.normalise_uri(dataset)
    shards = fmt.list_shards(uri, None if split == "all" else split)
    if not shards:
        raise FileNotFoundError(
            f"{dataset}: no {split!r} shards; make a test split with `pifuhd data synth --test-fraction ...` "
            "or pick another --split"
        )
    items = []
    for shard in shards:
        table = storage.read_parquet(shard, columns=["subject_id", "view"])
        for row, (subject, view) in enumerate(zip(table.column("subject_id").to_pylist(), table.column("view").to_pylist())):
            item = base_item(f"{subject}-view{int(view)}", subject, fmt.join(uri, "meshes", f"{subject}.ply"), int(view))
            items.append({**item, "kind": "view", "shard": shard, "row": row})
    return sorted(items, key=lambda i: i["key"])
