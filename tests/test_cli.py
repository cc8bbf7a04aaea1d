"""The command line's own contract: bad values stop before any work, in one line, with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import PRESET_NAMES, main


def test_a_bad_resolution_is_a_usage_error_before_any_work(tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(b"not read: the arguments fail first")
    code = main(["reconstruct", str(image), "-o", str(tmp_path / "out"), "--resolution", "100", "--in-process"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "pifuhd reconstruct: error:" in err and "100" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, named", [
    (["data", "synth", "--count", "0", "--out", "{tmp}/d"], "count"),
    (["data", "synth", "--count", "2", "--views", "0", "--out", "{tmp}/d"], "views"),
    (["data", "synth", "--count", "2", "--near-share", "1.5", "--out", "{tmp}/d"], "share"),
    (["data", "synth", "--count", "2", "--out", "memory://d"], "memory"),
    (["data", "scans", "http://example.com/scan.obj", "--out", "{tmp}/d"], "http"),
    (["evaluate", "--gt", "zip://x::y", "-o", "{tmp}/e"], "zip"),
    (["report", "{tmp}/out", "-o", "memory://r.html"], "memory"),
])
def test_data_evaluate_and_report_arguments_are_checked_first(tmp_path, capsys, argv, named):
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


def test_reading_results_loads_neither_torch_nor_ray():
    """The storage layer, URI checks and report reader import without the heavy stacks."""
    code = ("import sys, pipelines.storage, pipelines.uris, pipelines.report, model.errors; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_exit_codes_say_what_went_wrong(tmp_path, capsys):
    from pipelines import exit_codes
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


def test_a_ray_job_prints_its_progress_and_summary_without_ray_info_lines(tmp_path):
    from tests.helpers import person_image, write_tiny_checkpoint

    checkpoint = str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    person_image(tmp_path / "in" / "a.png")
    command = [sys.executable, "-m", "pipelines.cli", "reconstruct", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
               "--checkpoint", checkpoint, "--resolution", "32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 inputs: 1 ok")  # results on stdout
    assert "reconstruct: 100%" in result.stderr  # the progress bar on stderr
    noise = [line for line in result.stderr.replace("\r", "\n").splitlines() if re.search(r"\bINFO\b|Warning", line)]
    assert not noise, noise
