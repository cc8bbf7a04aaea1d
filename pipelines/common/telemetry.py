"""Prometheus metrics of the bulk reconstruction job and of training (prometheus-client).

The driver owns one registry: it observes every manifest row as it streams back,
serves the registry on an HTTP port while the job runs, and pushes it to a
Pushgateway at the end (the Prometheus convention for batch jobs).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

from model.errors import PifuhdError
from pipelines.common.uris import redact

log = logging.getLogger(__name__)

BULK_STAGES = ("read", "prepare", "encode", "surface", "mesh", "write")  # the bulk job's timed stages
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def check_pushgateway(address: str) -> None:
    """ValueError unless `address` is a Pushgateway address: host:port or http(s)://host:port[/path],
    without credentials (a secret given on a command line ends up in shells' histories and logs)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.query or parts.fragment:
        raise ValueError(f"--pushgateway {redact(address)!r}: expected host:port or http(s)://host:port")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"--pushgateway {redact(address)!r}: credentials in the address are not used")


def check_port(port: int, option: str = "--metrics-port") -> None:
    """ValueError unless `port` is a TCP port number (1-65535)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"{option} must be a port number from 1 to 65535, not {port}")


class BulkMetrics:
    """Counters and histograms of one bulk job, labelled by pipeline name (Prometheus owns `job`)."""

    def __init__(self, pipeline: str):
        self.pipeline = pipeline
        self.registry = CollectorRegistry()
        self.images = Counter(
            "pifuhd_images", "Images finished, by status and error class", ["pipeline", "status", "error_class"], registry=self.registry
        )
        self.stage_seconds = Histogram(
            "pifuhd_stage_seconds", "Seconds per image per pipeline stage", ["pipeline", "stage"], buckets=_STAGE_BUCKETS, registry=self.registry
        )
        self.points = Counter("pifuhd_points_evaluated", "Occupancy queries", ["pipeline"], registry=self.registry)
        self.in_flight = Gauge("pifuhd_images_in_flight", "Images listed but not yet finished", ["pipeline"], registry=self.registry)
        self.throughput = Gauge("pifuhd_images_per_second", "Finished images per second so far", ["pipeline"], registry=self.registry)

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Expose the registry on http://address:port/metrics for the job's lifetime (PifuhdError if it cannot)."""
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:  # in use, not allowed
            raise PifuhdError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None

    def observe(self, row: dict) -> None:
        """Account one finished manifest row."""
        self.images.labels(self.pipeline, row["status"], row.get("error_class") or "").inc()
        for stage in BULK_STAGES:
            seconds = row.get(f"seconds_{stage}")
            if seconds is not None and seconds == seconds:  # skip NaN
                self.stage_seconds.labels(self.pipeline, stage).observe(seconds)
        self.points.labels(self.pipeline).inc(row.get("points_evaluated") or 0)

    def push(self, gateway: str) -> None:
        """Push the registry to a Pushgateway (host:port or URL); a failure is logged, not raised."""
        try:
            push_to_gateway(gateway, job=f"pifuhd_{self.pipeline}", registry=self.registry)
        except Exception as exc:  # noqa: BLE001 - never lose a finished job's summary to its metrics
            log.warning("could not push metrics to %s: %s", redact(gateway), redact(str(exc)))


class TrainMetrics:
    """Gauges of one training run (rank 0): loss, step and validation metrics, pushed per report."""

    def __init__(self, run: str):
        self.run = run
        self.registry = CollectorRegistry()
        self.loss = Gauge("pifuhd_train_loss", "Mean training loss since the last report", ["run", "stage"], registry=self.registry)
        self.step = Gauge("pifuhd_train_step", "Optimiser steps done", ["run", "stage"], registry=self.registry)
        self.validation = Gauge("pifuhd_val_metric", "Validation metrics (chamfer_cm, p2s_cm, point_iou, ...)",
                                ["run", "stage", "metric"], registry=self.registry)

    def observe(self, report: dict, pushgateway: str | None = None) -> None:
        stage = report.get("stage", "")
        self.loss.labels(self.run, stage).set(report["loss"])
        self.step.labels(self.run, stage).set(report["step"])
        for key, value in report.items():
            if key.startswith("val_"):
                self.validation.labels(self.run, stage, key[4:]).set(value)
        if pushgateway:
            try:
                push_to_gateway(pushgateway, job=f"pifuhd_train_{self.run}", registry=self.registry)
            except Exception as exc:  # noqa: BLE001 - metrics never stop training
                log.warning("could not push metrics to %s: %s", redact(pushgateway), redact(str(exc)))
