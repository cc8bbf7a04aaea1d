"""Bulk jobs that nothing can stall, leak or corrupt (issue 15): one test per failure mode."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image


def test_large_image_is_cropped_before_float_conversion(tmp_path):
    """Decoding a big photo must not hold it as float32 in full (row 1: the 8000x8000 PNG peaked at 2.5 GB)."""
    side = 5000
    alpha = np.zeros((side, side), np.uint8)
    alpha[2000:2600, 2300:2500] = 255  # a small person: the crop is small, the image is not
    rgba = np.dstack([np.full((side, side, 3), 120, np.uint8), alpha])
    path = tmp_path / "big.png"
    Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
    probe = (
        "import resource, sys\n"
        "from model.preprocess import prepare_input\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "prepared = prepare_input(data, name='big.png', sizes=(64, 128))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert prepared.box_source == 'alpha'\n"
        "print((after - before) * 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bytes_per_pixel = int(result.stdout.strip()) / side**2
    # The file decodes to 4 bytes a pixel (RGBA uint8), held twice at most (PIL's copy and numpy's).
    assert bytes_per_pixel < 10, f"decoding peaked at {bytes_per_pixel:.1f} bytes per pixel"
