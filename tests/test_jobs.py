"""`pifuhd submit` / `pifuhd jobs` against a real Ray head started here (`ray start --head`
on 127.0.0.1, its own ports and temp dir, token auth on), stopped by the PIDs it started."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster import jobs
from pipelines import cli
from pipelines.common import exit_codes
from tests.helpers import free_ports, processes_mentioning

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`pifuhd ARGV`, in this process."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- without a cluster ---------------------------------------------------------------------


def test_submit_options_may_follow_the_command():
    parser = cli.build_parser()
    argv = ["submit", "train", "--stage", "coarse", "--address", "http://h:8265", "--data", "s3://b/d", "--no-follow"]
    args, remote = jobs._split_submit_args(parser.parse_args(argv))
    assert (args.remote_command, remote) == ("train", ["--stage", "coarse", "--data", "s3://b/d"])
    assert args.address == "http://h:8265" and args.no_follow is True
    spec = jobs.SubmitSpec(command=("train", *remote), working_dir=ROOT)
    assert spec.entrypoint() == "pifuhd train --stage coarse --data s3://b/d"
    env = spec.runtime_env()
    assert env["working_dir"] == str(ROOT) and {".venv", ".git", "out"} <= set(env["excludes"])


def test_unreachable_cluster_exits_with_the_cluster_code(capsys):
    [port] = free_ports(1)  # closed again: nothing listens there
    code, _, err = run_cli(["jobs", "list", "--address", f"http://127.0.0.1:{port}"], capsys)
    assert code == exit_codes.CLUSTER == 5 and "cannot use the Ray Jobs API" in err


# ---- a real head ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the dashboard on 127.0.0.1; yields (dashboard URL, temp dir)."""
    ray_bin = Path(sys.executable).parent / "ray"
    # A short path: Ray's Unix sockets live under it and paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="pfr-", dir="/tmp")
    gcs, dashboard, client, agent = free_ports(4)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every Ray listener on 127.0.0.1
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,  # this head's own token; ~/.ray/auth_token is left alone
        RAY_USAGE_STATS_ENABLED="0",
        # Job entrypoints run `pifuhd` from this venv, as on a cluster node after setup.sh.
        PATH=f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    argv = [
        str(ray_bin), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        # Fixed defaults (10001, 52365) would collide with other Ray instances on the machine.
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "wb")
    # --block keeps `ray start` as the parent of every process it launches, in a process
    # group of its own: stopping it (and that group) stops exactly this head.
    head = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    saved_token = os.environ.get("RAY_AUTH_TOKEN")
    os.environ["RAY_AUTH_TOKEN"] = token  # what `pifuhd submit` reads
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(request, timeout=2):
                    break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"ray head did not come up:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, Path(temp_dir)
    finally:
        if saved_token is None:
            os.environ.pop("RAY_AUTH_TOKEN", None)
        else:
            os.environ["RAY_AUTH_TOKEN"] = saved_token
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head still in its group
        except ProcessLookupError:
            pass
        for pid in processes_mentioning(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_pifuhd_and_follows_its_log(ray_head, capsys):
    url, _ = ray_head
    code, out, err = run_cli(["submit", "checkpoint", "--help", "--address", url], capsys)
    job_id = out.splitlines()[0]
    assert code == 0, out + err
    assert job_id.startswith("raysubmit_")
    assert "usage: pifuhd checkpoint" in out  # the job's own output, streamed back
    assert "SUCCEEDED" in err

    code, out, _ = run_cli(["jobs", "list", "--json", "--address", url], capsys)
    listed = {j["submission_id"]: j for j in json.loads(out)}
    assert code == 0 and listed[job_id]["status"] == "SUCCEEDED"
    assert listed[job_id]["entrypoint"] == "pifuhd checkpoint --help"


@pytest.mark.slow
def test_working_dir_is_the_checkout_without_local_state(ray_head, capsys):
    url, _ = ray_head
    probe = (
        'python -c "import os, pathlib; p = pathlib.Path; '
        "print('probe', p('pyproject.toml').is_file(), p('cluster/jobs.py').is_file(), p('.venv').exists(), "
        "p('.git').exists(), os.environ['PIFUHD_PROBE'])\""
    )
    code, out, _ = run_cli(
        ["submit", "--address", url, "--no-follow", "--job-env", "PIFUHD_PROBE=42", "--raw-entrypoint", probe], capsys
    )
    assert code == 0
    job_id = out.strip()
    code, out, _ = run_cli(["jobs", "logs", job_id, "--follow", "--address", url], capsys)
    assert code == 0
    assert "probe True True False False 42" in out


@pytest.mark.slow
def test_failed_job_exit_code_and_stop(ray_head, capsys):
    url, _ = ray_head
    # Submitted first so that it is running by the time it is stopped (the case that matters).
    code, out, _ = run_cli(
        ["submit", "--address", url, "--no-follow", "--raw-entrypoint", "python -c 'import time; time.sleep(120)'"],
        capsys,
    )
    sleeper = out.strip()

    code, out, err = run_cli(
        ["submit", "--address", url, "--raw-entrypoint", "python -c 'import sys; sys.exit(7)'"], capsys
    )
    assert code == 7, err  # the driver's own exit status
    assert "FAILED" in err

    deadline = time.monotonic() + 30
    while True:
        code, out, _ = run_cli(["jobs", "status", sleeper, "--address", url], capsys)
        if "RUNNING" in out or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    code, out, _ = run_cli(["jobs", "stop", sleeper, "--wait", "--address", url], capsys)
    assert code == 0 and "STOPPED" in out
    code, _, err = run_cli(["jobs", "logs", sleeper, "--follow", "--address", url], capsys)
    assert code == jobs.EXIT_STOPPED

    code, _, err = run_cli(["jobs", "logs", "raysubmit_nosuchjob", "--follow", "--address", url], capsys)
    assert code == jobs.EXIT_UNREACHABLE and "nosuchjob" in err


@pytest.mark.slow
def test_head_writes_the_service_discovery_file_prometheus_reads(ray_head):
    # cluster/prometheus/prometheus.yml relies on this file name and place.
    _, temp_dir = ray_head
    from cluster.metrics_stack import RAY_SD_FILE

    deadline = time.monotonic() + 20
    while not (temp_dir / RAY_SD_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    groups = json.loads((temp_dir / RAY_SD_FILE).read_text())
    assert groups and all(t.startswith("127.0.0.1:") for g in groups for t in g["targets"])
