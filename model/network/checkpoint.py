"""Load and save PIFuHD checkpoints.

Two formats are read:

* The released `pifuhd.pt`: a torch pickle of a dict with `model_state_dict` and the
  training options `opt` / `opt_netG` (argparse Namespaces). It is read with
  `torch.load(weights_only=True)` and Namespace as the only allow-listed class, so
  no code in the file can run. The architecture is inferred from the keys and
  shapes; the options only add the input sizes and depth scale.
* The project format: one safetensors file whose header metadata holds the
  config and a metadata record as JSON (`FORMAT` below). A safetensors file in the
  released key layout without that metadata is read like `pifuhd.pt`.
* The project format in shards: a folder with safetensors shards and the Hugging Face index
  (`INDEX_NAME`: the weight map, and the header's config and metadata), for stores and transfers
  that cap a file's size.

Every failure is a `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model

from model.network.config import HourglassConfig, MLPConfig, NormalNetConfig, PIFuHDConfig, PRESETS
from model.errors import CheckpointError
from model.network.pifuhd import PIFuHD

FORMAT = "pifuhd-ray"
FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"

# What the released options add to the shapes: (option holder, option, config field, type).
_OPTION_FIELDS = (
    ("opt_netG", "loadSize", "coarse_size", int),
    ("opt", "loadSizeBig", "fine_size", int),
    ("opt_netG", "z_size", "z_size", float),
)


# ---- reading files ------------------------------------------------------------------------


def _read_torch_pickle(path: Path) -> tuple[dict, dict]:
    """(state dict, options) from a torch pickle, loaded without executing any code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        # weights_only refuses any class that is not allow-listed; say which one (torch's own
        # message leads with advice to load it unsafely, which is not ours to give).
        text = str(exc)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        plain = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line and "torch.load" not in line]
        refused = f"the global {named.group(1)} is not allowed" if named else (plain or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: refused to unpickle (not a plain checkpoint): {refused}") from exc
    except TypeError as exc:  # an allow-listed class called with arguments it does not take
        raise CheckpointError(f"{path}: refused to unpickle (not a plain checkpoint): {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt torch file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if isinstance(payload, dict) and "model_state_dict" in payload:
        options = {
            name: vars(payload[name])
            for name in ("opt", "opt_netG")
            if isinstance(payload.get(name), argparse.Namespace)
        }
        state = payload["model_state_dict"]
    elif isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state, options = payload, {}
    else:
        raise CheckpointError(f"{path}: a torch file, but not a PIFuHD checkpoint (no 'model_state_dict')")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a mapping of tensors")
    return state, options


def _read_safetensors_header(path: Path) -> dict:
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc


def _read_safetensors_state(path: Path, tensors: bool = True) -> dict:
    """{key: tensor}; with tensors=False meta tensors of the stored shapes (nothing is read but the header)."""
    try:
        with safe_open(path, framework="pt") as handle:
            if tensors:
                return {key: handle.get_tensor(key) for key in handle.keys()}
            return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc


def index_of(path: str | os.PathLike) -> Path | None:
    """The index file of a sharded checkpoint at `path` (its folder or the index itself), else None."""
    path = Path(path)
    if path.is_dir():
        if not (path / INDEX_NAME).is_file():
            raise CheckpointError(f"{path}: a folder without {INDEX_NAME}, so not a sharded checkpoint")
        return path / INDEX_NAME
    return path if path.name.endswith(".index.json") else None


def shard_names(index: Path, text: str | bytes | None = None) -> tuple[dict, dict[str, str]]:
    """(header, weight map) of a shard index (`text`: its contents, when already read from
    elsewhere); CheckpointError unless every shard is a file name beside the index (an index must
    not point anywhere else)."""
    try:
        record = json.loads(index.read_text() if text is None else text)
        weight_map, header = record["weight_map"], record.get("metadata") or {}
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a readable shard index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(weight_map, dict) or not isinstance(header, dict):
        raise CheckpointError(f"{index}: 'weight_map' and 'metadata' must be JSON objects")
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard or shard.startswith("."):
            raise CheckpointError(f"{index}: shard {shard!r} is not a .safetensors file beside the index")
    return header, weight_map


def _read_sharded(index: Path, tensors: bool) -> tuple[dict, dict]:
    """(state, header) of a sharded checkpoint, each shard holding exactly what the index says."""
    header, weight_map = shard_names(index)
    state = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing")
        part = _read_safetensors_state(index.parent / shard, tensors)
        named = sum(1 for name in weight_map.values() if name == shard)
        if len(part) != named or any(weight_map.get(key) != shard for key in part):
            raise CheckpointError(f"{index.parent / shard}: holds {len(part)} tensors, not the {named} the index names for it")
        state.update(part)
    return state, header


def _sniff(path: Path) -> str:
    """'safetensors' or 'torch', from the first bytes; CheckpointError for anything else."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path}: empty or truncated file ({len(head)} bytes)")
    # safetensors first: its 8-byte header length may well start with 0x80, a pickle's first byte.
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and header_len < path.stat().st_size:
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch >= 1.6) or legacy pickle
        return "torch"
    raise CheckpointError(f"{path}: not a checkpoint (neither a torch file nor safetensors)")


# ---- inferring the architecture from a released state dict --------------------------------


def _indices(state: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state if (m := regex.fullmatch(key))})


def _infer_hourglass(state: dict, prefix: str, stem_pool: bool) -> HourglassConfig:
    stacks = _indices(state, re.escape(prefix) + r"l(\d+)\.weight")
    levels = _indices(state, re.escape(prefix) + r"m0\.b1_(\d+)\.conv1\.weight")
    if not stacks or not levels or stacks != list(range(len(stacks))):
        raise CheckpointError(f"no hourglass filter under '{prefix}'")
    return HourglassConfig(
        num_stacks=len(stacks),
        depth=max(levels),
        out_channels=state[f"{prefix}l0.weight"].shape[0],
        stem_pool=stem_pool,
        width=state[f"{prefix}conv4.downsample.2.weight"].shape[0],
    )


def _infer_mlp(state: dict, prefix: str) -> MLPConfig:
    if any(key.startswith(prefix + "norms.") for key in state):
        raise CheckpointError(f"'{prefix}norms.*': MLPs with normalisation layers are not supported")
    layers = _indices(state, re.escape(prefix) + r"filters\.(\d+)\.weight")
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"no MLP under '{prefix}filters.'")
    shapes = [tuple(state[f"{prefix}filters.{i}.weight"].shape) for i in layers]
    widths = [shapes[0][1]] + [shape[0] for shape in shapes]
    skips = []
    for index, shape in enumerate(shapes[1:], start=1):
        if shape[1] == widths[index] + widths[0]:
            skips.append(index)
        elif shape[1] != widths[index]:
            raise CheckpointError(f"'{prefix}filters.{index}.weight' {list(shape)} fits neither a plain nor a skip layer")
    return MLPConfig(widths=tuple(widths), skip_layers=tuple(skips))


def _infer_normal_net(state: dict, prefix: str) -> NormalNetConfig:
    convs = _indices(state, re.escape(prefix) + r"model\.(\d+)\.weight")
    blocks = _indices(state, re.escape(prefix) + r"model\.(\d+)\.conv_block\.1\.weight")
    if not convs or not blocks:
        raise CheckpointError(f"no normal net under '{prefix}'")
    return NormalNetConfig(
        base_width=state[f"{prefix}model.{convs[0]}.weight"].shape[0],
        num_downsamplings=sum(1 for index in convs if convs[0] < index < blocks[0]),
        num_res_blocks=len(blocks),
    )


def _infer_phi_layer(coarse_mlp: MLPConfig, phi_channels: int, options: dict) -> int:
    """The coarse hidden layer whose width matches what the fine MLP expects as phi."""
    candidates = [layer for layer in range(len(coarse_mlp.widths) - 2) if coarse_mlp.widths[layer + 1] == phi_channels]
    stored = options.get("opt_netG", {}).get("merge_layer")
    if stored in candidates:
        return stored
    if not candidates:
        raise CheckpointError(f"no coarse MLP layer has the {phi_channels} channels the fine MLP expects as phi")
    return candidates[0]


def infer_config(state: dict, options: dict | None = None) -> PIFuHDConfig:
    """The `PIFuHDConfig` of a state dict in the released key layout.

    options: {"opt": {...}, "opt_netG": {...}} from a released checkpoint, or {}.
    """
    options = options or {}
    first_normal = "netG.netF." if any(k.startswith("netG.netF.") for k in state) else "netG.netB."
    has_normals = any(k.startswith(first_normal) for k in state)
    coarse_filter = _infer_hourglass(state, "netG.image_filter.", stem_pool=True)
    fine_filter = _infer_hourglass(state, "image_filter.", stem_pool=False)
    coarse_mlp = _infer_mlp(state, "netG.mlp.")
    fine_mlp = _infer_mlp(state, "mlp.")
    sizes = {}
    for holder, option, field_name, kind in _OPTION_FIELDS:
        if option in options.get(holder, {}):
            sizes[field_name] = kind(options[holder][option])
    try:
        return PIFuHDConfig(
            normal_net=_infer_normal_net(state, first_normal) if has_normals else NormalNetConfig(),
            use_front_normal=any(k.startswith("netG.netF.") for k in state),
            use_back_normal=any(k.startswith("netG.netB.") for k in state),
            coarse_filter=coarse_filter,
            coarse_mlp=coarse_mlp,
            phi_layer=_infer_phi_layer(coarse_mlp, fine_mlp.widths[0] - fine_filter.out_channels, options),
            fine_filter=fine_filter,
            fine_mlp=fine_mlp,
            body_channels=coarse_mlp.widths[0] - coarse_filter.out_channels - 1,
            **sizes,
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"inconsistent PIFuHD layout: {exc}") from exc


def _check_header_config(config: PIFuHDConfig, state: dict) -> None:
    """CheckpointError unless the header's config has the stacks, depths, widths and layers its
    tensors have: a lying header must not make us build (and allocate) a network it does not hold."""
    found = {
        "coarse_filter": _infer_hourglass(state, "netG.image_filter.", stem_pool=True),
        "fine_filter": _infer_hourglass(state, "image_filter.", stem_pool=False),
        "coarse_mlp": _infer_mlp(state, "netG.mlp."),
        "fine_mlp": _infer_mlp(state, "mlp."),
    }
    problems = []
    for name, inferred in found.items():
        claimed = getattr(config, name)
        for field_name in ("num_stacks", "depth", "out_channels", "width", "widths", "skip_layers"):
            if hasattr(inferred, field_name) and getattr(claimed, field_name) != getattr(inferred, field_name):
                problems.append(f"{name}.{field_name} {getattr(claimed, field_name)} (tensors: {getattr(inferred, field_name)})")
    if problems:
        raise CheckpointError("header config does not match the tensors: " + "; ".join(problems[:4]))


# ---- building the network -----------------------------------------------------------------


def tied_keys(net: PIFuHD) -> dict[str, str]:
    """{alias key: first key} for state-dict keys that name the same parameter (bn4 / downsample.0)."""
    first: dict[int, str] = {}
    aliases = {}
    for key, param in net.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), key)
        if owner != key:
            aliases[key] = owner
    return aliases


def _check_layout(net: PIFuHD, state: dict) -> None:
    """Every key present with the right shape, nothing extra, tied keys equal."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {list(state[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            problems.append(f"{len(items)} {label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
    if problems:
        raise CheckpointError("state dict does not match the inferred architecture: " + "; ".join(problems))
    for alias, first in tied_keys(net).items():
        if not torch.equal(state[first], state[alias]):
            raise CheckpointError(f"tied keys {first} and {alias} hold different values")


def build_from_state(state: dict, config: PIFuHDConfig) -> PIFuHD:
    """A float32 network in eval mode holding `state` (released key layout)."""
    with torch.device("meta"):
        skeleton = PIFuHD(config)
    _check_layout(skeleton, state)
    net = PIFuHD(config)
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return net.eval()


def read_checkpoint(path: str | os.PathLike, tensors: bool = True) -> tuple[dict, PIFuHDConfig, dict]:
    """(state dict, config, metadata) of a checkpoint file, without building the network.

    metadata holds at least "format" ("pifuhd-ray", "released-torch" or "released-safetensors").
    tensors=False reads a safetensors file's header only (the state holds meta tensors of the
    stored shapes, enough to check the config): what a job's driver needs before the workers load.
    """
    path = Path(path)
    index = index_of(path)
    if index is not None:
        state, header = _read_sharded(index, tensors)
    elif _sniff(path) == "torch":
        state, options = _read_torch_pickle(path)
        try:
            config = infer_config(state, options)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        return state, config, {"format": "released-torch", "options": options}
    else:
        header = _read_safetensors_header(path)
        state = _read_safetensors_state(path, tensors)
    if header.get("format") == FORMAT:
        try:
            config = PIFuHDConfig.from_dict(json.loads(header["config"]))
            metadata = json.loads(header.get("metadata", "{}"))
        except (KeyError, TypeError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
            raise CheckpointError(f"{path}: damaged {FORMAT} header ({type(exc).__name__}: {str(exc)[:200]})") from None
        try:
            _check_header_config(config, state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        return state, config, {"format": FORMAT, "format_version": int(header.get("format_version", 0)), **metadata}
    try:
        config = infer_config(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return state, config, {"format": "released-safetensors"}


def load_checkpoint(path: str | os.PathLike) -> PIFuHD:
    """A `PIFuHD` network in eval mode from a released `pifuhd.pt` or a project checkpoint.

    The metadata read from the file is kept as `net.checkpoint_metadata`.
    """
    state, config, metadata = read_checkpoint(path)
    _refuse_non_finite(path, state.items())
    if metadata["format"] == FORMAT:
        state = _expand_tied(state, config)
    try:
        net = build_from_state(state, config)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    net.checkpoint_metadata = metadata
    return net


def _refuse_non_finite(path, tensors) -> None:
    """CheckpointError naming how many of the (key, tensor) pairs hold NaN or Inf, and the first."""
    damaged = [key for key, value in tensors if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        raise CheckpointError(f"{path}: {len(damaged)} weight tensors hold NaN or Inf (the first: {damaged[0]}): "
                              "the weights are damaged")


def check_finite_weights(path: str | os.PathLike) -> None:
    """CheckpointError when a weight of a safetensors checkpoint (one file or shards) is NaN or Inf.

    Reads one tensor at a time (a job's driver checks before any worker loads); a torch pickle is
    checked when `load_checkpoint` reads it whole."""
    path = Path(path)
    index = index_of(path)
    files = sorted({path.parent / name for name in shard_names(index)[1].values()} if index else {path})
    if index is None and _sniff(path) != "safetensors":
        return

    def tensors():
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        yield key, handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({exc})") from exc

    _refuse_non_finite(path, tensors())


def _expand_tied(state: dict, config: PIFuHDConfig) -> dict:
    """Re-add the alias keys the project format stores once (safetensors keeps no shared tensors)."""
    with torch.device("meta"):
        aliases = tied_keys(PIFuHD(config))
    expanded = dict(state)
    for alias, first in aliases.items():
        if alias not in expanded and first in expanded:
            expanded[alias] = expanded[first]
        elif first not in expanded and alias in expanded:
            expanded[first] = expanded[alias]
    return expanded


def save_checkpoint(
    net: PIFuHD, path: str | os.PathLike, metadata: dict | None = None, dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write `net` in the project format: safetensors weights, config and metadata as JSON in the header.

    metadata: JSON-serialisable facts about the weights (preset, training data, steps, metrics).
    dtype: storage type; float16 halves a shipped file, and loading always casts to float32.
    max_shard_bytes: write the folder `path` of shards of at most this many bytes of tensors each
    (one tensor larger than that gets a shard of its own) and their index, instead of one file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(net.config.to_dict()),
        "metadata": json.dumps(metadata or {}),
    }
    if dtype != torch.float32:
        net = copy.deepcopy(net).to(dtype)
    if max_shard_bytes is not None:
        return _save_sharded(net, path, header, max_shard_bytes)
    save_model(net, str(path), metadata=header)
    return path


def _save_sharded(net: PIFuHD, folder: Path, header: dict, max_shard_bytes: int) -> Path:
    """Shards and index in `folder`; the shards of an index written there before are replaced."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save

    aliases = tied_keys(net)
    state = {key: value.contiguous() for key, value in net.state_dict().items() if key not in aliases}
    # Shard names carry a hash of the weights: other weights written to the same folder go to new
    # files, so a reader of the old index never mixes the two, and an index names one set of weights.
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + b"\0")
        digest.update(state[key].reshape(-1).view(torch.uint8).numpy())
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes,
                                               filename_pattern=f"model-{digest.hexdigest()[:16]}{{suffix}}.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / INDEX_NAME
    previous = set(shard_names(index)[1].values()) if index.is_file() else set()
    for shard, keys in split.filename_to_tensors.items():
        # As bytes: safetensors' own file writer makes owner-only files, and a shared model folder is read by others.
        _write_atomic(folder / shard, save({key: state[key] for key in keys}, metadata={"format": "pt"}))
    # The index last: a reader sees the old set or the new, never half.
    _write_atomic(index, json.dumps({"metadata": header, "weight_map": split.tensor_to_filename}, indent=1).encode())
    for stale in previous - set(split.filename_to_tensors):
        (folder / stale).unlink(missing_ok=True)
    return folder


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all (written under a temporary name, then renamed)."""
    partial = path.with_name(f".{path.name}.part-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def with_metadata(path: str | os.PathLike, updates: dict) -> bytes:
    """A project-format checkpoint file's bytes with `updates` merged into its metadata record;
    the weights are copied as stored (dtype included)."""
    from safetensors.torch import save

    path = Path(path)
    if index_of(path) is not None:
        raise CheckpointError(f"{path}: a sharded checkpoint; give its single-file form (pifuhd checkpoint convert writes both)")
    header = _read_safetensors_header(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (convert it first: pifuhd checkpoint convert)")
    metadata = json.loads(header.get("metadata", "{}"))
    return save(_read_safetensors_state(path), metadata={**header, "metadata": json.dumps({**metadata, **updates})})


def preset_name(config: PIFuHDConfig) -> str | None:
    """The preset whose config equals `config` exactly, if any."""
    return next((name for name, make in PRESETS.items() if make() == config), None)
