"""The command line's own contract: bad values stop before any work, in one line, with exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import PRESET_NAMES, build_parser, main


@pytest.mark.parametrize("resolution", ["100", "0", "-64"])
def test_a_bad_resolution_is_a_usage_error_before_any_work(tmp_path, capsys, resolution):
    image = tmp_path / "photo.png"
    image.write_bytes(b"not read: the arguments fail first")
    code = main(["reconstruct", str(image), "-o", str(tmp_path / "out"), "--resolution", resolution, "--in-process"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "pifuhd reconstruct: error:" in err and resolution in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, named", [
    (["data", "synth", "--count", "0", "--out", "{tmp}/d"], "count"),
    (["data", "synth", "--count", "2", "--views", "0", "--out", "{tmp}/d"], "views"),
    (["data", "synth", "--count", "2", "--near-share", "1.5", "--out", "{tmp}/d"], "share"),
    (["data", "synth", "--count", "2", "--out", "memory://d"], "memory"),
    (["data", "scans", "http://example.com/scan.obj", "--out", "{tmp}/d"], "http"),
    (["evaluate", "--gt", "zip://x::y", "-o", "{tmp}/e"], "zip"),
    (["report", "{tmp}/out", "-o", "memory://r.html"], "memory"),
    (["data", "synth", "--count", "2", "--garments", "{tmp}/none", "--out", "{tmp}/d"], "MakeHuman"),
    (["reconstruct", "{tmp}/p.png", "-o", "{tmp}/o", "--min-person-score", "2"], "min_score"),
    (["train", "--stage", "coarse", "--data", "{tmp}/d", "-o", "{tmp}/o", "--steps", "0"], "steps"),
    (["train", "--stage", "coarse", "--data", "{tmp}/d", "-o", "{tmp}/o", "--lr", "-1"], "lr"),
    (["train", "--stage", "coarse", "--data", "{tmp}/d", "-o", "{tmp}/o", "--batch-size", "0"], "batch_size"),
    (["train", "--stage", "coarse", "--data", "{tmp}/d", "-o", "{tmp}/o", "--val-resolution", "48"], "resolution"),
])
def test_bad_values_are_usage_errors_before_any_work(tmp_path, capsys, argv, named):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusal (a URI outside the allow-list)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_preset_and_version():
    with pytest.raises(SystemExit) as exc:
        main(["train", "--stage", "coarse", "--data", "d", "--out", "o", "--preset", "huge"])
    assert exc.value.code == 2
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("pifuhd ")


def test_preset_names_match_the_model_presets():
    from model.network.config import PRESETS

    assert tuple(PRESETS) == PRESET_NAMES
    code = "import sys, pipelines.cli; print('torch' in sys.modules)"  # the command line stays light
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False", result.stderr


def test_the_formats_write_and_read_every_table_without_torch_or_ray(tmp_path):
    """Every job table round-trips through `pipelines.common.formats`, and neither it, the storage layer,
    the URI checks nor the report reader loads the heavy stacks."""
    code = f"""
import sys
import pipelines.common.dataset, pipelines.jobs.report, pipelines.common.storage, pipelines.common.uris
from pipelines.common import formats
out = {str(tmp_path)!r}
writer = formats.ManifestWriter(out, "r1", flush_rows=1, constants="v1")
writer.add({{"input_uri": "a.png", "status": "ok", "vertices": 3.0, "finished_at": 0}})
manifest = formats.read_manifest(out)
formats.write_results([{{"key": "k", "status": "ok", "chamfer_cm": 1}}], out)
results = formats.read_results(out)
formats.write_training_metrics(out + "/run", {{"step": 7, "loss": 0.5, "stage": "coarse"}})
metrics = formats.read_training_metrics(out + "/run")
summary = formats.summarize(results)
print(manifest["vertices"].tolist(), manifest["checkpoint_version"].tolist(), summary["metrics"]["chamfer_cm"]["mean"],
      metrics["step"].tolist(), sorted(m for m in ("torch", "ray") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[3] ['v1'] 1.0 [7] []"


def test_exit_codes_say_what_went_wrong(tmp_path, capsys):
    from pipelines.common import exit_codes
    from tests.helpers import person_image, write_tiny_checkpoint

    checkpoint = str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    person_image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    base = ["reconstruct", str(tmp_path / "in"), "--resolution", "32", "--in-process", "--quiet"]
    assert main([*base, "-o", str(tmp_path / "o1"), "--checkpoint", checkpoint]) == exit_codes.OK
    assert main([*base, "-o", str(tmp_path / "o2"), "--checkpoint", checkpoint, "--fail-on-error"]) == exit_codes.INPUTS_FAILED
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    code = main([*base, "-o", str(tmp_path / "o3"), "--checkpoint", str(tmp_path / "bad.safetensors")])
    assert code == exit_codes.UNUSABLE and "bad.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_a_ray_job_prints_its_progress_and_summary_without_ray_info_lines(tmp_path):
    from tests.helpers import person_image, write_tiny_checkpoint

    checkpoint = str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    person_image(tmp_path / "in" / "a.png")
    command = [sys.executable, "-m", "pipelines.cli", "reconstruct", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
               "--checkpoint", checkpoint, "--resolution", "32", "--on-ray"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 inputs: 1 ok")  # results on stdout
    assert "reconstruct: 100%" in result.stderr  # the progress bar on stderr
    noise = [line for line in result.stderr.replace("\r", "\n").splitlines() if re.search(r"\bINFO\b|Warning", line)]
    assert not noise, noise


def test_one_photo_runs_in_process_and_a_missing_input_fails_before_anything_starts(tmp_path, capsys):
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image, write_tiny_checkpoint

    checkpoint = str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    code = main(["reconstruct", str(tmp_path / "missing.png"), "-o", str(tmp_path / "out"), "--checkpoint", checkpoint])
    err = capsys.readouterr().err
    assert code == 4 and "missing.png: no such file" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing created, and no Ray started: the inputs are listed first

    person_image(tmp_path / "in" / "a.png")
    command = [sys.executable, "-m", "pipelines.cli", "reconstruct", str(tmp_path / "in" / "a.png"), "-o",
               str(tmp_path / "out"), "--checkpoint", checkpoint, "--resolution", "32", "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0 and out.startswith(b"1 inputs: 1 ok")
    assert read_manifest(str(tmp_path / "out"))["worker"].tolist() == [str(driver.pid)]  # the command's own process


# The arguments each config-building command needs, and the config fields they set.
MINIMAL_ARGUMENTS = {
    ("reconstruct",): (["in.png", "-o", "out"], {"inputs", "output", "checkpoint", "fallback_checkpoint"}),
    ("train",): (["--stage", "coarse", "--data", "d", "-o", "o"], {"stage", "data", "out"}),
    ("evaluate",): (["--gt", "g", "-o", "o"], {"gt", "out", "fallback"}),
    ("data", "synth"): (["--count", "1", "-o", "o"], {"out", "kind", "count"}),
    ("data", "scans"): (["x.obj", "-o", "o"], {"out", "kind", "inputs"}),
    ("fit",): (["in.png", "-o", "o"], {"inputs", "output"}),
    ("train-lifter",): (["-o", "o.safetensors"], set()),
    ("checkpoint", "calibrate"): (["c.safetensors", "--data", "d", "-o", "o.safetensors"], {"checkpoint", "data", "output"}),
    ("report",): (["run", "-o", "r.html"], {"inputs", "output"}),
}


def _subparsers(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def _departures(config, given=frozenset(), prefix="", defaults=None) -> list[str]:
    """Fields of a (nested) config whose value is not its default, outside `given`; a nested config's
    defaults are its parent's default instance of it (`defaults`: e.g. evaluate's makes no colours)."""
    found = []
    for f in dataclasses.fields(config):
        if f.name in given:
            continue
        value = getattr(config, f.name)
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(value):
            found += _departures(value, prefix=f"{prefix}{f.name}.", defaults=default)
        elif value != default:
            found.append(f"{prefix}{f.name}: option default {value!r}, config default {default!r}")
    return found


def test_every_option_has_help_and_the_configs_defaults():
    """The command line holds each default once, the config's: an option left out builds a config
    equal to the config's own defaults; every option says what it does, and --help shows defaults."""
    parser = build_parser()
    undocumented = [f"{' '.join(path)} {action.option_strings[0]}" for path, sub in _subparsers(parser)
                    for action in sub._actions if action.option_strings and not action.help]
    assert undocumented == []
    for command, (argv, given) in MINIMAL_ARGUMENTS.items():
        args = parser.parse_args([*command, *argv])
        assert _departures(args.config(args), frozenset(given)) == [], command
    help_text = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--steps STEPS" in help_text and "(default: 1000)" in help_text


def _config_value(config, dest: str):
    for name in dest.split("."):
        config = getattr(config, name)
    return config


# Switches of the command itself, not of its config (--children sets the fit's or the generator's age range).
COMMAND_SWITCHES = {"quiet", "in_process", "on_ray", "fail_on_error", "children"}


def test_every_switch_reaches_the_config():
    """Each on/off option flips the config field it names (a flag parsed but never passed on, as
    `data scans --fixed-yaws` once was, fails here)."""
    parser = build_parser()
    checked = 0
    for command, (argv, _) in MINIMAL_ARGUMENTS.items():
        sub = dict(_subparsers(parser))[command]
        for action in sub._actions:
            if not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                continue
            args = parser.parse_args([*command, *argv])
            config = args.config(args)
            if action.dest in COMMAND_SWITCHES:
                continue
            assert _has_path(config, action.dest), (command, action.option_strings[0])
            flipped = parser.parse_args([*command, *argv, action.option_strings[0]])
            assert _config_value(flipped.config(flipped), action.dest) != _config_value(config, action.dest), \
                (command, action.option_strings[0])
            checked += 1
    assert checked >= 15


def _has_path(config, dest: str) -> bool:
    for name in dest.split("."):
        if not (dataclasses.is_dataclass(config) and name in {f.name for f in dataclasses.fields(config)}):
            return False
        config = getattr(config, name)
    return True
