"""Where the project keeps what it builds or fetches once per machine (anny's build, remote
checkpoints): `PIFUHD_RAY_CACHE`, by default ~/.cache/pifuhd-ray."""

import os
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("PIFUHD_RAY_CACHE", Path.home() / ".cache" / "pifuhd-ray"))
