"""Training data, never read at inference.

- `humans`: synthetic people (anny bodies, procedural or real garments: `garments`), fixed by a seed;
- `scans`: real scans as subjects; `scan_bodies`: the body under a scan's clothes;
- `known_bodies`: rendered bare bodies with known truth (lifter training, tests, benchmarks);
- `scenes`: camera views, lighting and backgrounds of a training render;
- `sampling`: query points and their inside/outside labels.
"""
