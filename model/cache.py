"""Where the project keeps what it builds or fetches once per machine (anny's build, remote
checkpoints): `PIFUHD_RAY_CACHE`, by default ~/.cache/pifuhd-ray."""

import os
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("PIFUHD_RAY_CACHE", Path.home() / ".cache" / "pifuhd-ray"))


def configure_caches() -> None:
    """Point anny's and warp's caches at a stable directory before either is imported.

    anny's first build parses its assets for about 70-100 s and caches ~0.8 GB per topology; later
    builds in any process read that cache in under a second, so the location must not move.
    """
    os.environ.setdefault("ANNY_CACHE_DIR", str(CACHE_ROOT / "anny"))
    os.environ.setdefault("WARP_CACHE_PATH", str(CACHE_ROOT / "warp"))
