"""`pifuhd submit` and `pifuhd jobs`: run project commands on a Ray cluster via the Ray Jobs API.

    pifuhd submit train --stage coarse --data s3://b/d --out s3://b/r --address http://HEAD:8265
    pifuhd jobs list --address http://HEAD:8265
    pifuhd jobs logs raysubmit_... --follow
    pifuhd jobs stop raysubmit_...

`submit` uploads this checkout as the job's runtime_env working_dir (so the cluster runs the
code you have, not whatever its image holds) and runs `pifuhd <COMMAND> <ARGS>` as the job's
entrypoint on the head. The cluster must have the project installed (ray_cluster.yaml and
the Kubernetes image run ./setup.sh): the upload brings the code, not its dependencies.

Submit options may come before or after COMMAND; every other argument goes to the remote
command unchanged. The options carry a `job`/`entrypoint` prefix where a project command
could plausibly use the plain name (`--num-gpus`, `--env`).

Authentication: Ray 2.60 clusters started with RAY_AUTH_MODE=token reject requests without
the cluster token. The token is read from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token (Ray's own order) and sent as a bearer header.

Exit status of `submit` (when following) and `jobs logs --follow`: 0 if the job SUCCEEDED,
the driver's exit code (else 1) if it FAILED, 3 if it was STOPPED, 2 if the cluster could not
be reached or refused the request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pipelines.common import exit_codes

if TYPE_CHECKING:  # Ray is imported lazily: `pifuhd --help` must stay instant.
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Never uploaded: local virtualenvs, VCS data and outputs are large, machine-specific, and
# Ray caps a working_dir package (a few hundred MiB).
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".venv",
    "venv",
    ".git",
    "out",
    "outputs",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    "*.egg-info",
    "*.safetensors",
    "*.pt",
    "*.pth",
)

# Commands that act on the local machine and make no sense as a cluster job.
LOCAL_ONLY_COMMANDS = frozenset({"submit", "jobs", "metrics"})

# `pifuhd jobs status/logs --wait` end with the job's own exit code, or these (pipelines.common.exit_codes).
EXIT_SUCCEEDED = exit_codes.OK
EXIT_FAILED = exit_codes.CLUSTER  # the job failed without an exit code of its own
EXIT_UNREACHABLE = exit_codes.CLUSTER
EXIT_STOPPED = exit_codes.TERMINATED


class ClusterError(Exception):
    """The Ray dashboard could not be reached or refused a request; the message says which."""


@contextlib.contextmanager
def _job_client_errors():
    """The job client's RuntimeErrors (unknown job id, a refused request) as ClusterError."""
    try:
        yield
    except RuntimeError as exc:
        raise ClusterError(str(exc)) from exc


@dataclass(frozen=True)
class SubmitSpec:
    """Everything `submit` sends: the remote pifuhd argv and how to run it."""

    command: tuple[str, ...]
    working_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    submission_id: str | None = None
    # Hidden escape hatch (tests, debugging): run this shell command instead of `pifuhd ...`.
    raw_entrypoint: str | None = None

    def entrypoint(self) -> str:
        if self.raw_entrypoint:
            return self.raw_entrypoint
        return shlex.join(["pifuhd", *self.command])

    def runtime_env(self) -> dict:
        env: dict = {"working_dir": str(self.working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
        # Unbuffered: the followed log shows progress lines as they happen.
        env["env_vars"] = {"PYTHONUNBUFFERED": "1", **self.env}
        return env


# ---- connection ---------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS when they are dashboard URLs, else local."""
    if address:
        return address
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def auth_headers() -> dict[str, str]:
    """The bearer header for a token-auth cluster, or {} when no token is configured."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None) -> "JobSubmissionClient":
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        # Explicit headers: Ray only adds its own when this process runs in token mode.
        return JobSubmissionClient(url, headers=auth_headers())
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"cannot use the Ray Jobs API at {url}: {exc}") from exc


def project_root() -> Path:
    """The checkout to upload: the directory holding this project's pyproject.toml."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and 'name = "pifuhd-ray"' in pyproject.read_text():
            return candidate
    raise ClusterError("no pifuhd-ray checkout found to upload; pass --working-dir")


# ---- operations ---------------------------------------------------------------------------


def submit(client: "JobSubmissionClient", spec: SubmitSpec) -> str:
    """Submit the job; returns its submission id."""
    if spec.command and spec.command[0] in LOCAL_ONLY_COMMANDS:
        raise ClusterError(f"`pifuhd {spec.command[0]}` runs on this machine, not as a cluster job")
    if not spec.command and not spec.raw_entrypoint:
        raise ClusterError("nothing to run: give a pifuhd command, e.g. `train ...`")
    try:
        return client.submit_job(
            entrypoint=spec.entrypoint(),
            runtime_env=spec.runtime_env(),
            submission_id=spec.submission_id,
            entrypoint_num_cpus=spec.entrypoint_num_cpus,
            entrypoint_num_gpus=spec.entrypoint_num_gpus,
            metadata={"submitted_by": "pifuhd submit"},
        )
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"submission refused: {exc}") from exc


def follow(client: "JobSubmissionClient", job_id: str, out: TextIO | None = None):
    """Stream the job's log to `out` until the job ends; returns its final JobStatus.

    The websocket closes when the job reaches a terminal state. If it drops earlier, the job
    is polled until it ends and the part of the log not yet shown is fetched in one piece.
    """
    out = out or sys.stdout
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    interrupted = False
    try:
        asyncio.run(tail())
    except Exception as exc:  # aiohttp and Ray raise several unrelated types here
        interrupted = True
        print(f"pifuhd: log stream interrupted ({exc}); polling the job status", file=sys.stderr)
    status = wait_until_terminal(client, job_id)
    if interrupted:
        out.write(client.get_job_logs(job_id)[written:])
        out.flush()
    return status


def wait_until_terminal(client: "JobSubmissionClient", job_id: str, timeout_s: float | None = None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(1.0)


def exit_code(client: "JobSubmissionClient", job_id: str) -> int:
    """Map the job's final state to this process's exit status (see the module docstring)."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return EXIT_SUCCEEDED
    if info.status == JobStatus.STOPPED:
        return EXIT_STOPPED
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and 0 < code < 256 else EXIT_FAILED


# ---- CLI ----------------------------------------------------------------------------------


def _add_address(parser: argparse.ArgumentParser, default=None) -> None:
    parser.add_argument(
        "--address",
        default=default,
        help=f"Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})",
    )


def _add_submit_options(parser: argparse.ArgumentParser, suppress_defaults: bool = False) -> None:
    """Submit's own options; added twice: before COMMAND (normal parse) and after it (re-parse)."""

    def default(value):
        return argparse.SUPPRESS if suppress_defaults else value

    _add_address(parser, default=default(None))
    parser.add_argument("--no-follow", action="store_true", default=default(False), help="print the job id and return")
    parser.add_argument(
        "--working-dir", type=Path, default=default(None), help="directory to upload (default: this checkout)"
    )
    parser.add_argument(
        "--job-env",
        action="append",
        default=default(None),
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable); not for secrets, the dashboard shows them",
    )
    parser.add_argument("--entrypoint-num-cpus", type=float, default=default(None), help="CPUs reserved for the driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=default(None), help="GPUs reserved for the driver")
    parser.add_argument("--submission-id", default=default(None), help="job id to use (must be unused)")
    parser.add_argument("--raw-entrypoint", default=default(None), help=argparse.SUPPRESS)


def _split_submit_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Pick submit's own options out of the arguments that followed COMMAND."""
    late = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_submit_options(late, suppress_defaults=True)
    parsed, remote = late.parse_known_args(args.remote_args)
    merged = argparse.Namespace(**{**vars(args), **vars(parsed)})
    return merged, remote


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClusterError(f"--job-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _run(handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except ClusterError as exc:
        print(f"pifuhd: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _cmd_submit(args: argparse.Namespace) -> int:
    args, remote = _split_submit_args(args)
    command = [args.remote_command, *remote] if args.remote_command else remote
    spec = SubmitSpec(
        command=tuple(command),
        working_dir=(args.working_dir or project_root()).resolve(),
        env=_parse_env(args.job_env),
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        submission_id=args.submission_id,
        raw_entrypoint=args.raw_entrypoint,
    )
    client = connect(args.address)
    job_id = submit(client, spec)
    # The id alone on stdout, so that `ID=$(pifuhd submit --no-follow ...)` works.
    print(job_id, flush=True)
    print(f"pifuhd: submitted {spec.entrypoint()!r} as {job_id} to {resolve_address(args.address)}", file=sys.stderr)
    if args.no_follow:
        return EXIT_SUCCEEDED
    return _follow_to_exit(client, job_id)


def _follow_to_exit(client: "JobSubmissionClient", job_id: str) -> int:
    with _job_client_errors():
        client.get_job_info(job_id)  # an unknown id fails here, not inside the log stream
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\npifuhd: stopped following; {job_id} keeps running (pifuhd jobs stop {job_id})", file=sys.stderr)
        return 130
    code = exit_code(client, job_id)
    message = client.get_job_info(job_id).message if code else ""
    print(f"pifuhd: job {job_id} {status.value}" + (f": {message}" if message else ""), file=sys.stderr)
    return code


def _cmd_list(args: argparse.Namespace) -> int:
    client = connect(args.address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if args.json:
        rows = [
            {
                "submission_id": j.submission_id,
                "status": j.status.value,
                "entrypoint": j.entrypoint,
                "start_time": j.start_time,
                "end_time": j.end_time,
                "message": j.message,
            }
            for j in jobs
        ]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'SUBMISSION ID':<30} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        print(f"{j.submission_id or j.job_id or '-':<30} {j.status.value:<10} {started:<20} {j.entrypoint}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.follow:
        return _follow_to_exit(client, args.job_id)
    with _job_client_errors():
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _job_client_errors():
        info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    with _job_client_errors():
        stopped = client.stop_job(args.job_id)
    if not stopped:
        print(f"{args.job_id} had already ended: {client.get_job_status(args.job_id).value}")
        return 0
    if args.wait:
        status = wait_until_terminal(client, args.job_id, timeout_s=60)
        print(f"{args.job_id}: {status.value}")
    else:
        print(f"{args.job_id}: stop requested")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `submit` and `jobs` subcommands to the `pifuhd` parser."""
    submit_parser = subparsers.add_parser(
        "submit",
        help="run a pifuhd command as a job on a Ray cluster",
        description="Upload this checkout and run `pifuhd COMMAND ARGS...` on a Ray cluster through the Jobs API. "
        "Options below may also follow COMMAND; all other arguments go to the remote command.",
    )
    _add_submit_options(submit_parser)
    # dest names differ from `command`: the top-level pifuhd parser stores its subcommand there.
    submit_parser.add_argument(
        "remote_command",
        metavar="COMMAND",
        nargs="?",
        help="pifuhd subcommand: train, reconstruct, data, evaluate, ...",
    )
    submit_parser.add_argument("remote_args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")
    submit_parser.set_defaults(handler=lambda a: _run(_cmd_submit, a))

    jobs_parser = subparsers.add_parser("jobs", help="list, inspect and stop jobs on a Ray cluster")
    actions = jobs_parser.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="all jobs of the cluster")
    _add_address(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=lambda a: _run(_cmd_list, a))
    logs = actions.add_parser("logs", help="a job's driver log")
    logs.add_argument("job_id", metavar="ID")
    _add_address(logs)
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit status as submit")
    logs.set_defaults(handler=lambda a: _run(_cmd_logs, a))
    status = actions.add_parser("status", help="a job's state")
    status.add_argument("job_id", metavar="ID")
    _add_address(status)
    status.set_defaults(handler=lambda a: _run(_cmd_status, a))
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id", metavar="ID")
    _add_address(stop)
    stop.add_argument("--wait", action="store_true", help="return once the job has stopped")
    stop.set_defaults(handler=lambda a: _run(_cmd_stop, a))
