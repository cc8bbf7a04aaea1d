"""Faults the reliability tests and benchmarks inject: a worker killed as the OOM killer would."""

from __future__ import annotations

import os
import signal
import threading
import time


def descendants_of(root: int) -> set[int]:
    """Every process below `root` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


class OutOfMemoryKiller:
    """Kills, with SIGKILL as the kernel's OOM killer does, every process of this test that reads `fifo`.

    The poisoned input is a named pipe that nobody writes: a worker reading it blocks in
    open() (kernel wait channel `wait_for_partner`) until this thread finds and kills it,
    every time any worker tries it. Only descendants of this process are looked at. Counts the kills.
    """

    def __init__(self, fifo):
        os.mkfifo(fifo)
        self.kills = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _opening_a_fifo(pid: int) -> bool:
        try:
            return any(open(f"/proc/{pid}/task/{tid}/wchan").read() == "wait_for_partner"
                       for tid in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return False

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in descendants_of(os.getpid()):
                if self._opening_a_fifo(pid):
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
