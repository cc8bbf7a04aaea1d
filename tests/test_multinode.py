"""A node that dies mid-job, on a real multi-node Ray cluster on this machine.

As in `ray_cluster.yaml`, the head schedules no work (0 CPUs) and a worker node (2 CPUs) does
it all. Each node is started with `ray start --block` on 127.0.0.1 in a process group of its own,
so it stops by its PIDs and nothing else on the machine is touched. The jobs run as `pifuhd`
subprocesses against the head. Once the worker node is doing the job's work, every process of
that node is killed (SIGKILL, a lost machine) and a replacement node joins, as an autoscaler
would bring one. The bulk job must still account for every input exactly once; a two-worker
training run must resume from its last checkpoint on the new node and finish.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.common.formats import read_manifest
from tests.helpers import free_ports, person_image, processes_mentioning, write_tiny_checkpoint

# `ray start` itself, with one guard lifted. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray
# process on 127.0.0.1, but its command line then refuses a second node (a guard meant for
# Windows and macOS laptops), and 1 would make the nodes listen on every interface. So the command
# line runs with the guard off and its address lookups pinned to loopback; the node's processes
# inherit 0 and bind 127.0.0.1 only (a test checks).
RAY_START = [sys.executable, "-c",
             "import sys; import ray._private.ray_constants as constants, ray._private.services as services; "
             "constants.ENABLE_RAY_CLUSTER = True; services.get_node_ip_address = lambda address=None: '127.0.0.1'; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
INPUTS = 24


class Cluster:
    """A head without CPUs and a worker node of 2 CPUs that can be killed and replaced, on 127.0.0.1."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.port, self.client, self.agent = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        # Health checks every second, three misses: a lost node is declared dead in seconds, not ~30 s.
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                        RAY_health_check_failure_threshold="3")
        self.env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_USAGE_STATS_ENABLED="0")
        self.nodes: list[subprocess.Popen] = []
        self.worker: subprocess.Popen | None = None

    def _start(self, argv: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.temp_dir / log_name, "ab")
        node = subprocess.Popen([*RAY_START, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 *argv], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.nodes.append(node)
        return node

    def start_head(self) -> None:
        self._start(["--head", "--num-cpus=0", f"--port={self.port}", "--include-dashboard=false",
                     f"--ray-client-server-port={self.client}",
                     f"--dashboard-agent-listen-port={self.agent}", f"--temp-dir={self.temp_dir}"], "head.log")
        self.wait_for_nodes(1)

    def worker_argv(self) -> list[str]:
        return [f"--address={self.address}", "--num-cpus=2", f"--dashboard-agent-listen-port={free_ports(1)[0]}"]

    def start_worker(self) -> None:
        self.worker = self._start(self.worker_argv(), "worker.log")
        self.wait_for_nodes(2)

    def query(self, code: str) -> str:
        """The value of a Python expression, evaluated in a fresh driver on the cluster (this process
        has its own local Ray)."""
        prelude = f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
        result = subprocess.run([sys.executable, "-c", prelude + f"print('RESULT', {code})"], env=self.env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        # Ray may print warnings to stdout too (a busy raylet): the answer is the marked line.
        return next(line for line in result.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT ")

    def wait_for_nodes(self, count: int, seconds: float = 120) -> None:
        """Until `count` nodes are alive (a lost node counts as alive until the head's health checks fail)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if int(self.query("sum(n['Alive'] for n in ray.nodes())")) == count:
                    return
            except AssertionError:
                pass  # the head is not up yet, or busy
            time.sleep(1)
        pytest.fail(f"cluster did not reach {count} nodes:\n{(self.temp_dir / 'head.log').read_text()[-3000:]}")

    def listeners(self) -> list[str]:
        """Local addresses of the TCP sockets the cluster's processes listen on (`ss`, by process group)."""
        groups = {node.pid for node in self.nodes if node.poll() is None}
        table = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        found = []
        for line in table.splitlines():
            pids = [int(p) for p in re.findall(r"pid=(\d+)", line)]
            try:
                ours = any(os.getpgid(pid) in groups for pid in pids)
            except ProcessLookupError:
                continue
            if ours:
                found.append(line.split()[3])
        return found

    def worker_ids(self) -> set[str]:
        return set(json.loads(self.query("json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')])")))

    def replace_worker(self) -> None:
        """SIGKILL every process of the worker node (its process group): a lost machine; then a new one joins."""
        lost = self.worker_ids()
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()
        self.worker = self._start(self.worker_argv(), "worker.log")
        deadline = time.monotonic() + 120
        while not self.worker_ids() - lost:
            assert time.monotonic() < deadline, "the replacement node never joined"
            time.sleep(1)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(timeout=5)  # then its process group is killed below
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in processes_mentioning(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="pfm-", dir="/tmp"))  # short: Ray's socket paths are limited
    cluster = Cluster(temp_dir)
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until(condition, driver: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if driver.poll() is not None:
            pytest.fail(f"the job ended before {what}: {driver.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            driver.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_bulk_job_accounts_for_every_input_when_a_node_dies(cluster, tmp_path):
    cluster.start_worker()
    listening = cluster.listeners()
    assert listening and all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in listening), listening
    inputs = tmp_path / "in"
    for index in range(INPUTS):
        person_image(inputs / f"p{index:02d}.png")
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "reconstruct", str(inputs), "-o", str(out), "--checkpoint", str(checkpoint),
         "--resolution", "64", "--model-actors", "2", "--prepare-actors", "2", "--address", cluster.address, "--quiet"],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_until(lambda: len(list((out / "meshes").glob("*.json"))) >= 3, driver, 120, "three finished inputs")
    done_before = len(list((out / "meshes").glob("*.json")))
    cluster.replace_worker()
    stdout, stderr = driver.communicate(timeout=300)

    assert driver.returncode == 0, stderr[-3000:]
    assert done_before < INPUTS  # the node died mid-job
    manifest = read_manifest(str(out))
    assert len(manifest) == INPUTS and manifest["input_uri"].is_unique  # every input exactly once
    assert (manifest["status"] == "ok").all(), manifest[manifest["status"] != "ok"][["input_uri", "error_message"]]
    assert f"{INPUTS} inputs: {INPUTS} ok, 0 failed" in stdout


@pytest.mark.slow
def test_training_resumes_on_the_remaining_node(cluster, tmp_path, tiny_dataset):
    cluster.start_worker()
    run = tmp_path / "runs" / "drill"
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", "--stage", "normal", "--data", tiny_dataset, "-o", str(run.parent),
         "--name", "drill", "--preset", "tiny", "--workers", "2", "--cpus-per-worker", "0.5",
         "--batch-size", "1", "--steps", "8", "--checkpoint-every", "2", "--validate-every", "100", "--max-failures", "2",
         "--address", cluster.address],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_until(lambda: any(run.glob("checkpoint_*")), driver, 180, "the first checkpoint")
    cluster.replace_worker()
    stdout, stderr = driver.communicate(timeout=400)

    assert driver.returncode == 0, stderr[-3000:]
    assert "after 8 steps" in stdout and (run / "model.safetensors").exists()
    from pipelines.common.formats import read_training_metrics

    steps = sorted(read_training_metrics(str(run))["step"])
    # Resumed from a checkpoint, not from scratch: step 2 (the checkpoint seen before the kill) came once.
    assert steps[-1] == 8 and {2, 4, 6, 8} <= set(steps) and steps.count(2) == 1, steps
