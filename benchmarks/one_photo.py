"""One photo, default command: wall time of `pifuhd reconstruct PHOTO -o OUT` as a user runs it.

    .venv/bin/python benchmarks/one_photo.py [--photo examples/person.png] [--repeats 2]

Runs the command as a new process (start-up, model load, the job, shutdown included), alternately
with the default settings (a job this small runs in the command's own process) and with `--on-ray`
(the same stages on a private local Ray instance, as every job ran before), into fresh output
folders. Target: under 15 s on 2 cores for the default.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall_seconds(photo: str, out: str, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", "reconstruct", photo, "-o", out, "--quiet", *extra],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", default=str(ROOT / "examples" / "person.png"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"default": [], "--on-ray": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name in times:
                extra = () if name == "default" else (name,)
                times[name].append(wall_seconds(args.photo, f"{scratch}/{name}-{repeat}", *extra))
    for name, values in times.items():
        print(f"{name:>9}: {statistics.median(values):.1f} s median wall ({', '.join(f'{v:.1f}' for v in values)})")
    print("target: the default under 15 s")


if __name__ == "__main__":
    main()
