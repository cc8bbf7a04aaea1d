"""`pifuhd metrics up|down|status`: a local Prometheus and Pushgateway for pifuhd-ray.

    pifuhd metrics up                # prints the URLs and PIDs
    pifuhd metrics down              # stops exactly the processes `up` started

Both servers listen on 127.0.0.1 only. Prometheus scrapes Ray's metrics agents (found
through the service-discovery file Ray writes in its temp dir), the project's
prometheus_client endpoints (a targets file in the state directory) and the Pushgateway;
the config is rendered from cluster/prometheus/prometheus.yml. The Grafana dashboards in
cluster/grafana/ query the metric names listed in PROJECT_METRICS and RAY_METRICS.

The state directory holds the rendered config, the TSDB, the logs and state.json with the
PIDs; `down` stops only those PIDs, after checking that each still runs the program `up`
started with this directory (a PID can be reused after a crash or a reboot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

CLUSTER_DIR = Path(__file__).resolve().parent
PROMETHEUS_TEMPLATE = CLUSTER_DIR / "prometheus" / "prometheus.yml"
GRAFANA_DIR = CLUSTER_DIR / "grafana"
LOOPBACK = "127.0.0.1"
# File name fixed by Ray (ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE), written at the
# top of its temp dir and rewritten as nodes come and go.
RAY_SD_FILE = "prom_metrics_service_discovery.json"

# Metric families the project exports (prometheus_client names, without the _total /
# _bucket suffixes Prometheus adds), by type, as pipelines/common/telemetry.py defines them
# (BulkMetrics for reconstruction, TrainMetrics for training). Dashboards may only query
# these and RAY_METRICS; tests/test_metrics_stack.py checks both against those registries.
PROJECT_METRICS: dict[str, str] = {
    "pifuhd_images": "counter",  # labels: pipeline, status (ok|failed|skipped), error_class
    "pifuhd_stage_seconds": "histogram",  # labels: pipeline, stage
    "pifuhd_points_evaluated": "counter",
    "pifuhd_images_in_flight": "gauge",
    "pifuhd_images_per_second": "gauge",
    "pifuhd_train_loss": "gauge",  # labels: run, stage
    "pifuhd_train_step": "gauge",  # labels: run, stage
    "pifuhd_val_metric": "gauge",  # labels: run, stage, metric (chamfer_cm, p2s_cm, s2p_cm, point_iou, ...)
}
# Ray's per-node metrics (exported by every node's metrics agent) the dashboards use.
RAY_METRICS: dict[str, str] = {
    "ray_node_gpus_utilization": "gauge",  # percent, labels: GpuIndex, GpuDeviceName, instance
    "ray_node_gram_used": "gauge",
    "ray_node_gram_available": "gauge",
    "ray_node_cpu_utilization": "gauge",
    "ray_node_mem_used": "gauge",
    "ray_node_mem_total": "gauge",
}

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count", ""),
}


def series_names(families: dict[str, str]) -> set[str]:
    """The series names Prometheus stores for these metric families (what PromQL can reference)."""
    return {name + suffix for name, kind in families.items() for suffix in _SUFFIXES[kind]}


class MetricsStackError(Exception):
    """The stack cannot be started or stopped; the message says why."""


def default_state_dir() -> Path:
    if os.environ.get("PIFUHD_METRICS_DIR"):
        return Path(os.environ["PIFUHD_METRICS_DIR"])
    state_home = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state_home / "pifuhd" / "metrics"


def default_ray_temp_dir() -> Path:
    # Ray's own default (RAY_TMPDIR or the system temp dir, then "ray"), without importing Ray.
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"


@dataclass(frozen=True)
class StackConfig:
    directory: Path
    prometheus_port: int = 9090
    pushgateway_port: int = 9091
    scrape_interval: str = "15s"
    ray_temp_dir: Path = default_ray_temp_dir()
    # host:port of the project's prometheus_client HTTP endpoints.
    targets: tuple[str, ...] = ()

    @property
    def prometheus_address(self) -> str:
        return f"{LOOPBACK}:{self.prometheus_port}"

    @property
    def pushgateway_address(self) -> str:
        return f"{LOOPBACK}:{self.pushgateway_port}"

    @property
    def config_file(self) -> Path:
        return self.directory / "prometheus.yml"

    @property
    def targets_file(self) -> Path:
        return self.directory / "pifuhd_targets.json"


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str


def _state_file(directory: Path) -> Path:
    return directory / "state.json"


# ---- configuration ------------------------------------------------------------------------


def render_prometheus_config(config: StackConfig, template: Path = PROMETHEUS_TEMPLATE) -> str:
    """The template with this stack's addresses and files filled in."""
    return string.Template(template.read_text()).substitute(
        scrape_interval=config.scrape_interval,
        ray_service_discovery_file=str(config.ray_temp_dir / RAY_SD_FILE),
        pifuhd_targets_file=str(config.targets_file),
        pushgateway_address=config.pushgateway_address,
        prometheus_address=config.prometheus_address,
    )


def write_config(config: StackConfig) -> Path:
    """Write prometheus.yml and the project targets file into the state directory."""
    config.directory.mkdir(parents=True, exist_ok=True)
    config.config_file.write_text(render_prometheus_config(config))
    # file_sd format; Prometheus re-reads it on change, so targets can be added while it runs.
    groups = [{"targets": list(config.targets), "labels": {"source": "pifuhd"}}] if config.targets else []
    config.targets_file.write_text(json.dumps(groups, indent=2) + "\n")
    return config.config_file


# ---- processes ----------------------------------------------------------------------------


def find_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MetricsStackError(
            f"`{name}` not found on PATH; on Debian/Ubuntu: "
            "apt-get install -y --no-install-recommends prometheus prometheus-pushgateway"
        )
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:  # reap it if it is our own exited child, else it lingers as a zombie
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


def _runs_ours(pid: int, binary: str, directory: Path) -> bool:
    """Whether PID still runs `binary` with arguments under `directory` (i.e. ours)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():  # no procfs: trust the liveness check alone
        return _alive(pid)
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(args)
        and Path(os.fsdecode(args[0])).name == Path(binary).name
        and str(directory).encode() in b" ".join(args)
    )


def _log_tail(log: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(service: Service, timeout_s: float) -> None:
    url = f"{service.url}/-/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(service.pid):
            raise MetricsStackError(
                f"{service.name} (pid {service.pid}) exited; {service.log}:\n{_log_tail(service.log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise MetricsStackError(f"{url} not ready after {timeout_s:.0f} s; {service.log}:\n{_log_tail(service.log)}")


def _terminate(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _alive(pid):
        time.sleep(0.05)


def _start(argv: list[str], log: Path) -> int:
    with log.open("ab") as out:
        # Own session: Ctrl-C in the shell that ran `up` must not take the stack down.
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process.pid


_BINARIES = {"prometheus": "prometheus", "pushgateway": "prometheus-pushgateway"}


def read_state(directory: Path) -> dict[str, Service]:
    path = _state_file(directory)
    if not path.exists():
        return {}
    return {name: Service(**fields) for name, fields in json.loads(path.read_text()).items()}


def up(config: StackConfig, timeout_s: float = 30.0) -> dict[str, Service]:
    """Start Pushgateway and Prometheus on 127.0.0.1; returns the services (also in state.json)."""
    directory = config.directory.resolve()
    config = replace(config, directory=directory)
    running = {
        n: s for n, s in read_state(directory).items() if _alive(s.pid) and _runs_ours(s.pid, _BINARIES[n], directory)
    }
    if running:
        pids = ", ".join(str(s.pid) for s in running.values())
        raise MetricsStackError(f"already up in {directory} (PIDs {pids}); run `pifuhd metrics down` first")
    prometheus_bin, pushgateway_bin = find_binary(_BINARIES["prometheus"]), find_binary(_BINARIES["pushgateway"])
    for port in (config.prometheus_port, config.pushgateway_port):
        if not _port_free(port):
            raise MetricsStackError(
                f"port {LOOPBACK}:{port} is in use; choose another with --prometheus-port/--pushgateway-port"
            )
    write_config(config)
    (directory / "data").mkdir(exist_ok=True)

    services: dict[str, Service] = {}
    try:
        log = directory / "pushgateway.log"
        pid = _start(
            [
                pushgateway_bin,
                f"--web.listen-address={config.pushgateway_address}",
                # Pushed batch results survive a restart of the stack.
                f"--persistence.file={directory / 'pushgateway.db'}",
            ],
            log,
        )
        services["pushgateway"] = Service("pushgateway", pid, f"http://{config.pushgateway_address}", str(log))
        log = directory / "prometheus.log"
        pid = _start(
            [
                prometheus_bin,
                f"--config.file={config.config_file}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={config.prometheus_address}",
                "--storage.tsdb.retention.time=15d",
            ],
            log,
        )
        services["prometheus"] = Service("prometheus", pid, f"http://{config.prometheus_address}", str(log))
        _state_file(directory).write_text(json.dumps({n: asdict(s) for n, s in services.items()}, indent=2) + "\n")
        for service in services.values():
            _wait_ready(service, timeout_s)
    except BaseException:
        for service in services.values():
            _terminate(service.pid, timeout_s=5)
        _state_file(directory).unlink(missing_ok=True)
        raise
    return services


def down(directory: Path, timeout_s: float = 10.0) -> list[int]:
    """Stop the processes recorded by `up` in this directory; returns the PIDs stopped."""
    directory = directory.resolve()
    stopped = []
    for name, service in read_state(directory).items():
        if _alive(service.pid) and _runs_ours(service.pid, _BINARIES[name], directory):
            _terminate(service.pid, timeout_s)
            stopped.append(service.pid)
    _state_file(directory).unlink(missing_ok=True)
    return stopped


# ---- CLI ----------------------------------------------------------------------------------


def _print_services(services: dict[str, Service], directory: Path) -> None:
    for service in services.values():
        print(f"{service.name:<12} {service.url:<26} pid {service.pid}")
    print(f"{'config':<12} {directory / 'prometheus.yml'}")
    print(f"{'targets':<12} {directory / 'pifuhd_targets.json'} (project endpoints; editable while running)")
    print(f"{'dashboards':<12} {GRAFANA_DIR}/*.json (Grafana: Prometheus data source {services['prometheus'].url})")


def _cmd_up(args: argparse.Namespace) -> int:
    config = StackConfig(
        directory=args.dir,
        prometheus_port=args.prometheus_port,
        pushgateway_port=args.pushgateway_port,
        scrape_interval=args.scrape_interval,
        ray_temp_dir=args.ray_temp_dir,
        targets=tuple(args.target or ()),
    )
    services = up(config)
    _print_services(services, args.dir.resolve())
    print(f"push from batch jobs to {config.pushgateway_address}; stop with: pifuhd metrics down --dir {args.dir}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    stopped = down(args.dir)
    print(f"stopped PIDs {', '.join(map(str, stopped))}" if stopped else f"nothing running from {args.dir}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    services = read_state(args.dir.resolve())
    if not services:
        print(f"not up ({args.dir})")
        return 1
    for service in services.values():
        state = "running" if _alive(service.pid) else "exited"
        print(f"{service.name:<12} {service.url:<26} pid {service.pid} {state}")
    return 0 if all(_alive(s.pid) for s in services.values()) else 1


def _run(handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except MetricsStackError as exc:
        print(f"pifuhd: error: {exc}", file=sys.stderr)
        return 2


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `metrics up|down|status` to the `pifuhd` parser."""
    metrics = subparsers.add_parser(
        "metrics", help="local Prometheus + Pushgateway for the project's and Ray's metrics"
    )
    actions = metrics.add_subparsers(dest="metrics_command", metavar="ACTION", required=True)

    def with_dir(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--dir",
            type=Path,
            default=default_state_dir(),
            help="state directory: config, data, logs, PIDs (default: %(default)s)",
        )
        return parser

    start = with_dir(actions.add_parser("up", help="start Prometheus and Pushgateway on 127.0.0.1"))
    start.add_argument("--prometheus-port", type=int, default=9090, help="Prometheus listens on 127.0.0.1:PORT")
    start.add_argument("--pushgateway-port", type=int, default=9091, help="the Pushgateway listens on 127.0.0.1:PORT")
    start.add_argument("--scrape-interval", default="15s", help="Prometheus duration, e.g. 1s, 15s")
    start.add_argument(
        "--ray-temp-dir",
        type=Path,
        default=default_ray_temp_dir(),
        help="Ray's temp dir, holding its service-discovery file",
    )
    start.add_argument(
        "--target", action="append", metavar="HOST:PORT", help="a project metrics endpoint to scrape (repeatable)"
    )
    start.set_defaults(handler=lambda a: _run(_cmd_up, a))
    stop = with_dir(actions.add_parser("down", help="stop the processes `metrics up` started"))
    stop.set_defaults(handler=lambda a: _run(_cmd_down, a))
    status = with_dir(actions.add_parser("status", help="whether the stack is running"))
    status.set_defaults(handler=lambda a: _run(_cmd_status, a))
