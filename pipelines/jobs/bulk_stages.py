"""The three stages of a bulk reconstruction, as Ray Data runs them (`pipelines.jobs.bulk` wires them).

    read + hash + find the person + preprocess   `InputPreparer` (CPU actors: one person finder each)
    encode + occupancy queries                  `SurfaceSampler` (model actors, GPU when there is one)
    marching cubes, colour, export, write       `MeshFinisher` (CPU actors; a GPU never waits for meshing)

Rows travel as tables of `STAGE_SCHEMA` (`pipelines.common.stage_rows`). With
`PersonOptions.all_people` the prepare stage turns one input into one row per person found
(outputs `NAME_p<k>.*`, k = 0 the most prominent). The `.json` marker written last beside each
finished mesh lets a re-run skip inputs with the same content hash and checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time

import numpy as np
import pyarrow as pa

from model.body.fit import FitConfig, LowQualityFit
from model.errors import InputError, SurfaceError
from model.reconstruction.people import PersonInput, PersonOptions
from model.reconstruction.reconstruct import ReconstructionConfig
from pipelines.common import stage_rows
from pipelines.common.formats import MANIFEST_SCHEMA
from pipelines.common.inputs import InputItem
from pipelines.common.stage_actors import register_this_actor
from pipelines.common.storage import remove_quietly, write_bytes_atomic
from pipelines.common.uris import redact


STAGE_SCHEMA = stage_rows.stage_schema(
    MANIFEST_SCHEMA,
    *[(name, pa.string()) for name in ("output_stem", "person_mask_uri", "person_json_uri", "body_mesh_uri",
                                       "body_params_uri", "marker_uri")],
    ("person_indices", pa.list_(pa.int64())),  # the people the prepare stage produced (the driver checks each came back)
    ("first_of_input", pa.bool_()),
)


def output_uris(base: str, mesh_format: str) -> dict[str, str]:
    """Every output of one reconstruction, beside each other: BASE.FORMAT, BASE_preview.png, the
    finder's BASE_person.png (mask) and BASE_person.json, with a body fit BASE_body.FORMAT and its
    anny parameters BASE_body.json, and the BASE.json marker (written last)."""
    return {
        "mesh_uri": f"{base}.{mesh_format}",
        "preview_uri": f"{base}_preview.png",
        "person_mask_uri": f"{base}_person.png",
        "person_json_uri": f"{base}_person.json",
        "body_mesh_uri": f"{base}_body.{mesh_format}",
        "body_params_uri": f"{base}_body.json",
        "marker_uri": f"{base}.json",
    }


# ---- stage 1: read, hash, skip check, preprocess (CPU) -----------------------------------


MARKER_FIELDS = ("run_id", "input_uri", "content_hash", "settings_key", "checkpoint_id", "mask_source", "mesh_uri", "preview_uri",
                 "vertices", "faces", "bbox_min", "bbox_max", "person_index", "persons_found", "person_score", "person_mask_area")


def already_finished(record: dict) -> bool:
    """Whether this record's outputs exist for the same content and settings (then it is
    marked skipped, with its numbers from the marker; or ok, when this very run wrote them and
    only the row was lost, with the node that held it)."""
    marker = stage_rows.finished_marker(record["marker_uri"])
    if not (marker and marker.get("content_hash") == record["content_hash"] and marker.get("settings_key") == record["settings_key"]):
        return False
    status = "ok" if marker.get("run_id") == record["run_id"] else "skipped"
    record.update(status=status, **{k: marker.get(k) for k in MARKER_FIELDS if k not in record or record[k] is None})
    record["checkpoint_id"] = marker.get("checkpoint_id") or record.get("checkpoint_id")  # the model that made the files
    return True


def _person_files(record: dict, person_input: PersonInput) -> dict[str, bytes]:
    """The finder's mask (8-bit PNG, the image's size) and JSON record for one output; {} when it did not run."""
    from model.render import png_bytes

    person = person_input.person
    if person is None:
        return {}
    height, width = person.mask_soft.shape
    document = {"input_uri": record["input_uri"], "image_size": {"width": width, "height": height},
                "person_index": person_input.index, "persons_found": person_input.persons_found, **person.to_dict()}
    return {
        record["person_mask_uri"]: png_bytes((person.mask_soft * 255 + 0.5).astype(np.uint8)),
        record["person_json_uri"]: json.dumps(document).encode(),
    }


class InputPreparer:
    """CPU stage: read, hash, skip check, find the person, preprocess.

    A callable class, so Ray Data builds it once per actor: the person finder (mode "auto")
    loads once per actor, not per image.
    """

    def __init__(self, sizes: tuple[int, ...], overwrite: bool, max_pixels: int, person: PersonOptions, mesh_format: str,
                 body: bool = False, fit: FitConfig = FitConfig(), body_optional: bool = False, quality_gate: bool = False,
                 registry=None):
        from model.person import PersonFinder

        register_this_actor(registry)
        self.sizes, self.overwrite, self.max_pixels = sizes, overwrite, max_pixels
        self.person, self.mesh_format, self.body, self.fit = person, mesh_format, body, fit
        self.body_optional = body_optional  # a failed fit is noted in the row, not a failed row
        self.quality_gate = quality_gate  # a low-quality fit is not given to the network (the fallback meshes)
        self.finder = PersonFinder() if person.mode == "auto" else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for record, _ in stage_rows.rows(batch):
            out.extend(self.prepare(record))
        return stage_rows.to_table(out, STAGE_SCHEMA)

    def prepare(self, record: dict) -> list[tuple[dict, bytes]]:
        """One input's record -> its rows (one, or one per person with `all_people`)."""
        from model.reconstruction.people import prepare_people
        from model.image.decode import as_float, decode_image, DecodedImage, open_image

        item = InputItem(**record["item"])
        try:
            start = time.perf_counter()
            image = stage_rows.read_limited(item.uri, stage_rows.MAX_IMAGE_BYTES)
            limits = {"mask": stage_rows.MAX_IMAGE_BYTES, "rect": stage_rows.MAX_TEXT_SIDECAR_BYTES, "keypoints": stage_rows.MAX_TEXT_SIDECAR_BYTES}
            sidecars = {k: stage_rows.read_limited(getattr(item, f"{k}_uri"), limit) if getattr(item, f"{k}_uri") else None
                        for k, limit in limits.items()}
            digest = hashlib.sha256(image)
            for key in ("mask", "rect", "keypoints"):
                digest.update(key.encode() + (sidecars[key] or b""))
            record["content_hash"] = digest.hexdigest()
            record["seconds_read"] = time.perf_counter() - start
            # One output per input: its marker is known before any work. With all_people the
            # outputs are known once the people are found, and each is checked then.
            if not self.person.all_people and not self.overwrite and already_finished(record):
                return [(record, b"")]
            start = time.perf_counter()
            name = redact(item.uri)
            # 8-bit photos stay uint8 (a big photo is never held as float32 in full); other depths
            # become float32 in [0, 1], which the person finder reads as it reads 8 bits.
            decoded = decode_image(open_image(image, name, self.max_pixels))
            if decoded.rgb.dtype != np.uint8:
                decoded = DecodedImage(as_float(decoded.rgb), None if decoded.alpha is None else as_float(decoded.alpha))
            inputs = prepare_people(decoded, self.finder, self.person, name=name, sizes=self.sizes,
                                    max_pixels=self.max_pixels, **sidecars)
            seconds = (time.perf_counter() - start) / len(inputs)
            rows = []
            indices = [person_input.index for person_input in inputs]  # the driver checks each came back
            for person_input in inputs:
                row = dict(record, person_indices=indices, first_of_input=person_input.index == indices[0])
                if self.person.all_people:
                    row.update(output_uris(f"{record['output_stem']}_p{person_input.index}", self.mesh_format))
                person = person_input.person
                row.update(person_index=person_input.index, persons_found=person_input.persons_found,
                           person_score=None if person is None else person.score,
                           person_mask_area=None if person is None else person.mask_area, seconds_prepare=seconds,
                           mask_source=person_input.prepared.mask_source)
                if self.person.all_people and not self.overwrite and already_finished(row):
                    rows.append((row, b""))
                    continue
                files = _person_files(row, person_input)
                prepared = person_input.prepared
                if self.body:
                    try:
                        prepared = self._fit_body(row, prepared, person_input, image, sidecars, files)
                    except InputError as exc:
                        if not self.body_optional:
                            raise
                        row["body_error"] = f"{type(exc).__name__}: {redact(str(exc))}"
                # The original photo is not needed downstream (colours come from the crop): don't ship it.
                prepared = dataclasses.replace(prepared, rgb=np.zeros((0, 0, 3), np.float32))
                rows.append((row, pickle.dumps((prepared, files), protocol=5)))
            return rows
        except Exception as exc:  # noqa: BLE001 - any failure becomes this input's failed row
            return [stage_rows.fail(record, exc)]


    def _fit_body(self, row: dict, prepared, person_input: PersonInput, image: bytes, sidecars: dict, files: dict):
        """Fit anny to the person (the finder's landmarks, else a keypoints sidecar or a finder run
        as `pifuhd fit` does); its mesh joins the files to write, and the prepared input carries it
        in the network frame for a body-guided model."""
        from model.body.export import body_json, mesh_bytes
        from model.reconstruction.body_guidance import with_fitted_body
        from pipelines.common.person import find_person

        start = time.perf_counter()
        name = redact(row["input_uri"])
        found = person_input.person
        if found is None:  # a mask or box sidecar, or --person off: the landmarks as `pifuhd fit` finds them
            found, _ = find_person(image, sidecars, name, self.max_pixels)
        with_body, fit = with_fitted_body(prepared, found.landmarks, found.world_landmarks, found.mask, self.fit, name)
        files[row["body_mesh_uri"]] = mesh_bytes(fit.vertices, fit.faces, self.mesh_format)
        files[row["body_params_uri"]] = body_json(fit, {"input_uri": row["input_uri"], "content_hash": row["content_hash"]}).encode()
        row.update(body_uri=row["body_mesh_uri"], body_mask_iou=fit.mask_iou,
                   seconds_prepare=row["seconds_prepare"] + time.perf_counter() - start)
        if fit.low_quality and self.quality_gate:
            row["body_error"] = f"{LowQualityFit.__name__}: {fit.quality_note}"
            return prepared
        return with_body


# ---- stage 2: model (GPU when available) ---------------------------------------------------


class SurfaceSampler:
    """Model actor: one network per actor (and its fallback, loaded when first needed); encodes a
    batch of images and queries their surfaces."""

    def __init__(self, checkpoint: str, reconstruction: ReconstructionConfig, use_gpu: bool,
                 fallback_checkpoint: str | None = None, batch_size: int = 1, registry=None, fallback_id: str | None = None):
        import torch

        register_this_actor(registry)
        self.batch_size = batch_size  # images per network call
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.net = self._load(checkpoint)
        self.fallback_checkpoint, self.fallback, self.fallback_id = fallback_checkpoint, None, fallback_id
        self.config = reconstruction

    def _load(self, checkpoint: str):
        from pipelines.common.checkpoints import fetch_checkpoint
        from model.network.checkpoint import load_checkpoint

        return load_checkpoint(fetch_checkpoint(checkpoint)).to(self.device)

    def _network_for(self, prepared):
        """The job's network, or the fallback for a photo a body-guided network cannot read."""
        if not self.net.config.body_guided or prepared.body is not None or self.fallback_checkpoint is None:
            return self.net
        if self.fallback is None:
            self.fallback = self._load(self.fallback_checkpoint)
        return self.fallback

    def __call__(self, batch: pa.Table) -> pa.Table:
        from model.reconstruction.reconstruct import sample_surfaces

        if not stage_rows.has_pending(batch):  # failed and skipped rows pass through as they are
            return batch
        rows = stage_rows.rows(batch)
        pending = [i for i, (record, _) in enumerate(rows) if record["status"] == "pending"]
        if pending:
            node, worker = stage_rows.where()
            unpacked = {i: pickle.loads(rows[i][1]) for i in pending}  # (prepared, person files)
            groups: dict[int, tuple] = {}
            for i in pending:
                net = self._network_for(unpacked[i][0])
                if net is not self.net:  # the fallback makes this mesh: its row names the fallback
                    rows[i][0]["checkpoint_id"] = self.fallback_id
                groups.setdefault(id(net), (net, []))[1].append(i)
            samples = {}
            for net, members in groups.values():
                for first in range(0, len(members), self.batch_size):
                    chunk = members[first:first + self.batch_size]
                    try:
                        samples.update(zip(chunk, sample_surfaces(net, [unpacked[i][0] for i in chunk], self.config)))
                    except Exception as exc:  # noqa: BLE001
                        samples.update((i, exc) for i in chunk)
            for i in pending:
                (p, files), sample, record = unpacked[i], samples[i], rows[i][0]
                record.update(node=node, worker=worker)
                if isinstance(sample, Exception):
                    rows[i] = stage_rows.fail(record, sample)
                    continue
                record.update(seconds_encode=sample.stats["seconds_encode"], seconds_surface=sample.stats["seconds_surface"],
                              points_evaluated=sample.stats["points_evaluated"])
                rows[i] = (record, pickle.dumps((p, files, sample), protocol=5))
        return stage_rows.to_table(rows, STAGE_SCHEMA)


# ---- stage 3: mesh, colour, export, write (CPU) ------------------------------------------


def finish_rows(batch: pa.Table, reconstruction: ReconstructionConfig, mesh_format: str) -> pa.Table:
    from model.reconstruction.reconstruct import encode_outputs, finish

    if not stage_rows.has_pending(batch):  # failed and skipped rows pass through as they are
        return batch
    out = []
    for record, payload in stage_rows.rows(batch):
        if record["status"] != "pending":
            out.append((record, b""))
            continue
        written: list[str] = []
        try:
            prepared, person_files, sample = pickle.loads(payload)
            start = time.perf_counter()
            result = finish(sample, prepared, reconstruction)
            record["seconds_mesh"] = time.perf_counter() - start
            check_surface(result.mesh.vertices, result.mesh.faces)
            start = time.perf_counter()
            files = encode_outputs(result, prepared, mesh_format)
            for uri, data in [(record["mesh_uri"], files["mesh"]), (record["preview_uri"], files["preview"]),
                              *person_files.items()]:
                written.append(uri)
                write_bytes_atomic(uri, data)
            bounds = result.mesh.bounds
            record.update(
                status="ok",
                vertices=len(result.mesh.vertices),
                faces=len(result.mesh.faces),
                bbox_min=[float(v) for v in bounds[0]],
                bbox_max=[float(v) for v in bounds[1]],
            )
            marker = {k: record.get(k) for k in MARKER_FIELDS}
            # The marker goes last: its presence means every output of this input is complete.
            write_bytes_atomic(record["marker_uri"], json.dumps(marker).encode())
            record["seconds_write"] = time.perf_counter() - start
            out.append((record, b""))
        except Exception as exc:  # noqa: BLE001
            remove_quietly(written)  # a full disk half-way: no output without its row and marker
            out.append(stage_rows.fail(record, exc))
    return stage_rows.to_table(out, STAGE_SCHEMA)


class MeshFinisher:
    """CPU stage actor: `finish_rows` on each batch."""

    def __init__(self, reconstruction: ReconstructionConfig, mesh_format: str, registry=None):
        register_this_actor(registry)
        self.reconstruction, self.mesh_format = reconstruction, mesh_format

    def __call__(self, batch: pa.Table) -> pa.Table:
        return finish_rows(batch, self.reconstruction, self.mesh_format)


def check_surface(vertices: np.ndarray, faces: np.ndarray) -> None:
    """SurfaceError unless a mesh has faces and finite vertices (an ok row always names a usable mesh)."""
    if len(faces) == 0:
        raise SurfaceError("the network's occupancy field has no surface at the surface level inside the person's box")
    if not np.isfinite(vertices).all():
        raise SurfaceError(f"{int((~np.isfinite(vertices)).any(axis=1).sum())} mesh vertices are NaN or Inf")
