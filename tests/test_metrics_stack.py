"""The metrics stack: Grafana dashboards and the Prometheus template are checked statically;
then `pifuhd metrics up` starts the real Prometheus and Pushgateway on 127.0.0.1, a small
batch job pushes project metrics, a prometheus_client endpoint serves another, and the values
are read back through Prometheus's query API, along with every dashboard expression."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from cluster import metrics_stack
from pipelines import cli
from cluster.metrics_stack import PROJECT_METRICS, RAY_METRICS, StackConfig, series_names

DASHBOARDS = sorted(metrics_stack.GRAFANA_DIR.glob("*.json"))
KNOWN_SERIES = series_names(PROJECT_METRICS) | series_names(RAY_METRICS)
BINARIES = ("prometheus", "prometheus-pushgateway")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows
    return [p for p in found if p.get("type") != "row"]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression references (label matchers and strings removed)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    return set(re.findall(r"\b(?:pifuhd|ray)_[A-Za-z0-9_]+\b", stripped))


def as_instant_query(expr: str) -> str:
    # Grafana's macros, as Grafana would expand them for a short range.
    return expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")


# ---- static checks -------------------------------------------------------------------------


def test_dashboards_exist():
    assert {p.name for p in DASHBOARDS} >= {"pifuhd-training.json", "pifuhd-reconstruction.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panels_query_known_metrics(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        where = f"{path.name}: panel {panel['title']!r}"
        assert panel["datasource"]["type"] == "prometheus", where
        uid = panel["datasource"]["uid"]
        if uid.startswith("$"):
            variable = variables[uid.strip("${}")]
            assert variable["type"] == "datasource" and variable["query"] == "prometheus", where
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            names = metric_names(target["expr"])
            assert names, f"{where}: {target['expr']!r} references no metric"
            unknown = names - KNOWN_SERIES
            assert not unknown, f"{where}: unknown metrics {sorted(unknown)}"


def test_dashboards_cover_the_required_views():
    exprs = " ".join(
        t["expr"] for path in DASHBOARDS for p in panels(json.loads(path.read_text())) for t in p["targets"]
    )
    for needed in (
        "pifuhd_train_loss",
        'pifuhd_val_metric{metric="chamfer_cm"}',
        "rate(pifuhd_images_total",
        "by (error_class)",
        "histogram_quantile(0.95, sum by (le, stage) (rate(pifuhd_stage_seconds_bucket",
        "ray_node_gpus_utilization",
    ):
        assert needed in exprs, needed


def dashboard_metric_names() -> set[str]:
    return {
        name
        for path in DASHBOARDS
        for panel in panels(json.loads(path.read_text()))
        for target in panel["targets"]
        for name in metric_names(target["expr"])
    }


def registry_families(registry) -> dict[str, str]:
    return {m.name: m.type for m in registry.collect()}


def test_known_metrics_match_the_pipeline_registries():
    """PROJECT_METRICS agrees with the registries pipelines/common/telemetry.py defines."""
    from pipelines.common import telemetry as module

    bulk = registry_families(module.BulkMetrics(pipeline="test").registry)
    for name, kind in bulk.items():
        assert PROJECT_METRICS.get(name) == kind, f"{name} ({kind}) missing from PROJECT_METRICS or typed differently"
    train = registry_families(module.TrainMetrics("test").registry)
    for name, kind in train.items():
        if name in PROJECT_METRICS:
            assert PROJECT_METRICS[name] == kind, f"{name}: {kind} in TrainMetrics, {PROJECT_METRICS[name]} here"
    # What the training dashboard queries must be what training exports.
    wanted = {n for n in dashboard_metric_names() if n.startswith(("pifuhd_train_", "pifuhd_val_"))}
    exported = series_names(train)
    assert wanted <= exported, f"dashboards query {sorted(wanted - exported)}, which TrainMetrics does not export"


def test_prometheus_config_renders(tmp_path):
    import yaml

    config = StackConfig(directory=tmp_path, prometheus_port=19090, pushgateway_port=19091, targets=("127.0.0.1:8000",))
    path = metrics_stack.write_config(config)
    rendered = yaml.safe_load(path.read_text())
    jobs = {job["job_name"]: job for job in rendered["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [
        str(config.ray_temp_dir / "prom_metrics_service_discovery.json")
    ]
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["pushgateway"]["static_configs"][0]["targets"] == ["127.0.0.1:19091"]
    assert json.loads(config.targets_file.read_text())[0]["targets"] == ["127.0.0.1:8000"]
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


# ---- the real stack ------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`pifuhd ARGV`, in this process."""
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def query(prometheus: str, expr: str) -> dict:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 400 carries the parse error as JSON
        return json.load(exc)


def wait_for(prometheus: str, expr: str, timeout_s: float = 20.0, until=None) -> list[dict]:
    """The first non-empty result of `expr` (for which `until(result)` holds, when given)."""
    deadline = time.monotonic() + timeout_s
    result = []
    while time.monotonic() < deadline:
        result = query(prometheus, expr)["data"]["result"]
        if result and (until is None or until(result)):
            return result
        time.sleep(0.25)
    raise AssertionError(f"{expr!r} returned {result or 'nothing'} within {timeout_s} s")


# A batch job as the project runs them: its own process, pushing its registry at the end.
BATCH_JOB = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry, Counter, Histogram, push_to_gateway

    registry = CollectorRegistry()
    images = Counter("pifuhd_images", "Images finished", ["status", "error_class"], registry=registry)
    stage = Histogram("pifuhd_stage_seconds", "Seconds per stage", ["stage"], buckets=(0.1, 1, 10), registry=registry)
    images.labels("ok", "").inc(5)
    images.labels("failed", "InputError").inc(2)
    for seconds in (0.05, 0.5, 0.5, 2.0):
        stage.labels("mesh").observe(seconds)
    push_to_gateway(sys.argv[1], job="pifuhd_reconstruct", registry=registry)
    """
)


@pytest.mark.slow
def test_metrics_stack_end_to_end(tmp_path, capsys):
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed (setup.sh installs prometheus prometheus-pushgateway)")
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    prom_port, gateway_port, app_port = free_port(), free_port(), free_port()
    state = tmp_path / "metrics"
    # A project process serving its registry over HTTP (as the bulk driver or a trainer does).
    registry = CollectorRegistry()
    loss = Gauge("pifuhd_train_loss", "Training loss", ["run", "stage"], registry=registry)
    loss.labels("r1", "coarse").set(0.125)
    server, _ = start_http_server(app_port, addr="127.0.0.1", registry=registry)

    up_argv = ["metrics", "up", "--dir", str(state), "--prometheus-port", str(prom_port)]
    up_argv += ["--pushgateway-port", str(gateway_port), "--scrape-interval", "1s", "--target", f"127.0.0.1:{app_port}"]
    code, out = run_cli(up_argv, capsys)
    assert code == 0, out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    try:
        assert len(pids) == 2 and f"http://127.0.0.1:{prom_port}" in out and f"http://127.0.0.1:{gateway_port}" in out
        prometheus = f"http://127.0.0.1:{prom_port}"

        # Starting twice on the same directory is refused instead of orphaning processes.
        code, out = run_cli(up_argv, capsys)
        assert code == 2 and "already up" in out

        job = subprocess.run(
            [sys.executable, "-c", BATCH_JOB, f"127.0.0.1:{gateway_port}"], capture_output=True, text=True, timeout=30
        )
        assert job.returncode == 0, job.stderr

        loss = wait_for(prometheus, 'pifuhd_train_loss{stage="coarse"}')
        assert float(loss[0]["value"][1]) == 0.125
        assert loss[0]["metric"]["job"] == "pifuhd"  # scraped through the targets file

        ok = wait_for(prometheus, 'pifuhd_images_total{status="ok"}')
        assert float(ok[0]["value"][1]) == 5
        assert ok[0]["metric"]["job"] == "pifuhd_reconstruct"  # honor_labels kept the pushed job
        failed = wait_for(prometheus, 'sum by (error_class) (pifuhd_images_total{status="failed"})')
        assert failed[0]["metric"] == {"error_class": "InputError"} and float(failed[0]["value"][1]) == 2
        median = wait_for(prometheus, "histogram_quantile(0.5, sum by (le, stage) (pifuhd_stage_seconds_bucket))")
        assert median[0]["metric"] == {"stage": "mesh"} and 0.1 <= float(median[0]["value"][1]) <= 1

        # The project's own training exporter, read back through the dashboard's query.
        try:
            from pipelines.common.telemetry import TrainMetrics
        except ImportError:
            TrainMetrics = None
        if TrainMetrics is not None:
            report = {"step": 3, "loss": 0.5, "stage": "coarse", "val_chamfer_cm": 1.25}
            TrainMetrics("e2e").observe(report, pushgateway=f"127.0.0.1:{gateway_port}")
            chamfer = next(
                t["expr"]
                for p in panels(json.loads((metrics_stack.GRAFANA_DIR / "pifuhd-training.json").read_text()))
                for t in p["targets"]
                if p["title"].startswith("Validation Chamfer")
            )
            found = wait_for(prometheus, chamfer)
            assert [float(r["value"][1]) for r in found if r["metric"].get("run") == "e2e"] == [1.25]

        # Every dashboard expression is valid PromQL for this Prometheus.
        for path in DASHBOARDS:
            for panel in panels(json.loads(path.read_text())):
                for target in panel["targets"]:
                    answer = query(prometheus, as_instant_query(target["expr"]))
                    assert answer["status"] == "success", f"{path.name} {panel['title']}: {answer.get('error')}"
    finally:
        server.shutdown()
        code, out = run_cli(["metrics", "down", "--dir", str(state)], capsys)
    assert code == 0 and sorted(int(p) for p in re.findall(r"\d+", out.split("PIDs", 1)[-1])) == sorted(pids)
    for pid in pids:
        assert not metrics_stack._alive(pid)
    assert not (state / "state.json").exists()
