"""`pifuhd report`: one self-contained HTML page about runs, reconstructions and their quality.

Inputs, any mix (each recognised by what it holds):
  * a bulk output folder (`OUT/manifest/*.parquet`) or one manifest part: throughput over
    time, time per stage, seconds per image, failure reasons;
  * an evaluation folder (`OUT/results.parquet` of `pifuhd evaluate`) or that file: summary
    table, metric distributions, failures, the worst cases with their previews and normal
    renders;
  * a training run folder (`OUT/NAME`, with `metrics/`) or a storage root holding several:
    loss and validation metrics against the step.

The page needs nothing but itself: plots are inline SVG drawn here, images are PNG data URIs
(downscaled), there is no script, and a Content-Security-Policy forbids any request, so it
opens offline and can be mailed or archived as one file.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from pipelines.common import exit_codes, storage
from pipelines.common.exit_codes import build_config
from pipelines.common.options import config_option, config_values
from pipelines.common.telemetry import BULK_STAGES
from pipelines.common.uris import uri_argument

log = logging.getLogger(__name__)

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
KINDS = ("manifest", "evaluation", "training")


@dataclass(frozen=True)
class ReportConfig:
    """One report: the inputs (folders or Parquet files, local or URIs) and the output file."""

    inputs: tuple[str, ...]
    output: str
    title: str = "pifuhd-ray report"
    worst: int = 8  # worst evaluation cases shown with their images
    image_width: int = 640  # embedded images are downscaled to at most this many pixels wide

    def __post_init__(self) -> None:
        if self.worst < 0 or self.image_width < 16:
            raise ValueError(f"worst must be >= 0 and image_width >= 16, not {self.worst} and {self.image_width}")


@dataclass
class Source:
    """One recognised input: kind (manifest | evaluation | training), where, its table (pandas)."""

    kind: str
    uri: str
    table: object
    name: str = ""


@dataclass
class Page:
    sections: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"svg": 0, "img": 0})


# ---- inputs --------------------------------------------------------------------------------


def _kind_of_table(columns) -> str | None:
    columns = set(columns)
    if {"input_uri", "seconds_read"} <= columns:
        return "manifest"
    if {"chamfer_cm", "status"} <= columns:
        return "evaluation"
    if {"step", "loss"} <= columns:
        return "training"
    return None


def load_sources(uri: str) -> list[Source]:
    """The sources one input holds (a folder may hold several); ValueError if none."""
    import pandas as pd
    from pipelines.common.formats import read_manifest, read_results, read_training_metrics

    fs, path = storage.filesystem(uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if not fs.isdir(path):
        table = storage.read_parquet(uri).to_pandas()
        kind = _kind_of_table(table.columns)
        if kind is None:
            raise ValueError(f"{uri}: not a manifest, evaluation results or training metrics table")
        return [Source(kind, uri, table, name)]
    sources = []
    if fs.isdir(path + "/manifest"):
        sources.append(Source("manifest", uri, read_manifest(uri), name))
    if fs.exists(path + "/results.parquet"):
        sources.append(Source("evaluation", uri, read_results(uri), name))
    runs = [uri] if fs.isdir(path + "/metrics") else []
    if not sources and not runs:
        # A training storage root: one run per sub-folder.
        runs = [storage.join(uri, p.rstrip("/").rsplit("/", 1)[-1]) for p in sorted(fs.ls(path, detail=False))
                if fs.isdir(p + "/metrics")]
    for run in runs:
        table = read_training_metrics(run)
        if len(table):
            sources.append(Source("training", run, pd.DataFrame(table), run.rstrip("/").rsplit("/", 1)[-1]))
    if not sources:
        raise ValueError(f"{uri}: holds no manifest/, results.parquet or training metrics/")
    return sources


def image_data_uri(uri: str | None, max_width: int) -> str | None:
    """A PNG data URI of an image file (downscaled to max_width), or None if it can't be read."""
    if not uri or not isinstance(uri, str):
        return None
    from PIL import Image

    try:
        fs, path = storage.filesystem(uri)
        image = Image.open(io.BytesIO(fs.cat_file(path)))
        image.load()
    except Exception as exc:  # noqa: BLE001 - a missing preview is shown as missing, not fatal
        log.warning("cannot embed %s: %s", uri, exc)
        return None
    image = image.convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, max(1, round(image.height * max_width / image.width))), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- SVG plots -----------------------------------------------------------------------------


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    """A number for a table or an axis: 4 significant digits, '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5, 5 x 10^k steps) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


class _Axes:
    """The mapping of one plot: data (x, y) -> SVG pixels, with margins for the title, a key
    line under it (legend or statistics), tick labels and axis labels."""

    def __init__(self, xticks, yticks, width=640, height=270, left=64, right=16, top=44, bottom=44):
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.xticks, self.yticks = xticks, yticks
        self.x0, self.x1 = xticks[0], xticks[-1]
        self.y0, self.y1 = yticks[0], yticks[-1]

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (value - self.x0) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - self.bottom - (value - self.y0) / span * (self.height - self.top - self.bottom)

    def title(self, title: str) -> list[str]:
        return [f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#fff"/>',
                f'<text x="{self.width / 2:.1f}" y="18" class="t">{_esc(title)}</text>']

    def frame(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        parts = self.title(title)
        for tick in self.yticks:
            y = self.y(tick)
            parts.append(f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>')
            parts.append(f'<text x="{self.left - 6}" y="{y + 4:.1f}" class="yl">{_esc(_fmt(tick))}</text>')
        for tick in self.xticks:
            x = self.x(tick)
            parts.append(f'<text x="{x:.1f}" y="{self.height - self.bottom + 16}" class="xl">{_esc(_fmt(tick))}</text>')
        base = self.height - self.bottom
        parts.append(f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{base}" y2="{base}" class="a"/>')
        parts.append(f'<line x1="{self.left}" x2="{self.left}" y1="{self.top}" y2="{base}" class="a"/>')
        parts.append(f'<text x="{(self.left + self.width - self.right) / 2:.1f}" y="{self.height - 6}" class="xl">{_esc(xlabel)}</text>')
        parts.append(f'<text transform="translate(14,{(self.top + base) / 2:.1f}) rotate(-90)" class="xl">{_esc(ylabel)}</text>')
        return parts

    def key(self, entries: list[tuple[str, str]]) -> list[str]:
        """A one-line key under the title: (colour, label) entries side by side."""
        parts, x = [], self.left
        for colour, label in entries:
            parts.append(f'<line x1="{x}" x2="{x + 16}" y1="30" y2="30" stroke="{colour}" stroke-width="3"/>')
            parts.append(f'<text x="{x + 20}" y="34" class="lg">{_esc(label)}</text>')
            x += 28 + 7 * len(label)
        return parts


def _svg(parts: list[str], axes: _Axes, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" width="{axes.width}" height="{axes.height}" '
            f'viewBox="0 0 {axes.width} {axes.height}"><title>{_esc(title)}</title>{"".join(parts)}</svg>')


def _empty_svg(title: str, width: int = 640, message: str = "no data") -> str:
    axes = _Axes([0, 1], [0, 1], width=width, height=70)
    return _svg(axes.title(title) + [f'<text x="{axes.width / 2}" y="50" class="xl">{_esc(message)}</text>'], axes, title)


def line_chart(series: list[tuple[str, np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
               width: int = 640) -> str:
    """SVG line chart of (label, xs, ys) series; non-finite points are dropped."""
    clean = []
    for label, xs, ys in series:
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        keep = np.isfinite(xs) & np.isfinite(ys)
        if keep.any():
            order = np.argsort(xs[keep], kind="stable")
            clean.append((label, xs[keep][order], ys[keep][order]))
    if not clean:
        return _empty_svg(title, width)
    all_x = np.concatenate([c[1] for c in clean])
    all_y = np.concatenate([c[2] for c in clean])
    low, high = float(all_y.min()), float(all_y.max())
    if 0 <= low < 0.5 * high:
        low = 0.0  # counts and mostly-positive curves read best from zero
    axes = _Axes(nice_ticks(all_x.min(), all_x.max(), 6), nice_ticks(low, high), width=width)
    parts = axes.frame(title, xlabel, ylabel)
    for index, (label, xs, ys) in enumerate(clean):
        colour = PALETTE[index % len(PALETTE)]
        if len(xs) == 1:
            parts.append(f'<circle cx="{axes.x(xs[0]):.1f}" cy="{axes.y(ys[0]):.1f}" r="3" fill="{colour}"/>')
        else:
            points = " ".join(f"{axes.x(a):.1f},{axes.y(b):.1f}" for a, b in zip(xs, ys))
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
    parts += axes.key([(PALETTE[i % len(PALETTE)], label[:32]) for i, (label, _, _) in enumerate(clean) if label])
    return _svg(parts, axes, title)


def histogram(values, title: str, xlabel: str, bins: int | None = None, width: int = 640) -> str:
    """SVG histogram of the finite values (about sqrt(n) bins, 5 to 30), mean and median marked."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return _empty_svg(title, width)
    bins = bins or int(np.clip(round(math.sqrt(len(values))), 5, 30))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5 * (abs(low) or 1), high + 0.5 * (abs(high) or 1)
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    axes = _Axes(nice_ticks(low, high, 6 if width >= 500 else 4), nice_ticks(0, counts.max(), 4), width=width)
    parts = axes.frame(title, xlabel, "count")
    for count, a, b in zip(counts, edges[:-1], edges[1:]):
        if count:
            x0, x1, y = axes.x(a), axes.x(b), axes.y(count)
            parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                         f'height="{axes.y(0) - y:.1f}" fill="{PALETTE[0]}"/>')
    mean, median = float(values.mean()), float(np.median(values))
    for value, colour in ((mean, PALETTE[1]), (median, PALETTE[2])):
        x = axes.x(value)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axes.top}" y2="{axes.y(0):.1f}" stroke="{colour}" '
                     'stroke-width="1.5" stroke-dasharray="4 3"/>')
    parts += axes.key([(PALETTE[1], f"mean {_fmt(mean)}"), (PALETTE[2], f"median {_fmt(median)}"), ("#fff", f"n={len(values)}")])
    return _svg(parts, axes, title)


def bar_chart(labels: list[str], values: list[float], title: str, xlabel: str, whiskers: list[float] | None = None,
              width: int = 640) -> str:
    """SVG horizontal bar chart (one bar per label), optional whiskers out to `whiskers` (e.g. p90)."""
    def finite(v) -> float | None:
        return float(v) if v is not None and math.isfinite(float(v)) else None

    values = [finite(v) or 0.0 for v in values]
    whiskers = [finite(w) for w in whiskers] if whiskers else [None] * len(values)
    if not labels:
        return _empty_svg(title, width)
    top = max(values + [w for w in whiskers if w is not None] + [0.0])
    row = 24
    axes = _Axes(nice_ticks(0, top or 1.0, 6), [0, 1], width=width, height=44 + 44 + row * len(labels), left=90, right=70)
    parts = axes.title(title)
    for tick in axes.xticks:
        x = axes.x(tick)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axes.top}" y2="{axes.height - axes.bottom}" class="g"/>')
        parts.append(f'<text x="{x:.1f}" y="{axes.height - axes.bottom + 16}" class="xl">{_esc(_fmt(tick))}</text>')
    parts.append(f'<text x="{(axes.left + axes.width - axes.right) / 2:.1f}" y="{axes.height - 6}" class="xl">{_esc(xlabel)}</text>')
    for index, (label, value, whisker) in enumerate(zip(labels, values, whiskers)):
        y, middle = axes.top + index * row + 4, axes.top + index * row + 4 + (row - 8) / 2
        end = axes.x(value)
        parts.append(f'<text x="{axes.left - 6}" y="{y + 13}" class="yl">{_esc(label)}</text>')
        parts.append(f'<rect x="{axes.left}" y="{y}" width="{max(end - axes.left, 0):.1f}" height="{row - 8}" '
                     f'fill="{PALETTE[index % len(PALETTE)]}"/>')
        if whisker is not None:
            x = axes.x(whisker)
            parts.append(f'<line x1="{end:.1f}" x2="{x:.1f}" y1="{middle}" y2="{middle}" stroke="#333"/>')
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y + 2}" y2="{y + row - 10}" stroke="#333"/>')
            end = max(end, x)
        parts.append(f'<text x="{end + 5:.1f}" y="{y + 13}" class="lg">{_esc(_fmt(value))}</text>')
    return _svg(parts, axes, title)


# ---- tables --------------------------------------------------------------------------------


def html_table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """An HTML table; cells from column `numeric_from` on are right-aligned numbers."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            if index >= numeric_from and (cell is None or isinstance(cell, (int, float, np.integer, np.floating))):
                cells.append(f'<td class="n">{_esc(_fmt(cell))}</td>')
            else:
                cells.append(f"<td>{_esc(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(svg: str) -> str:
    return f"<figure>{svg}</figure>"


# ---- sections ------------------------------------------------------------------------------


def manifest_section(source: Source, config: ReportConfig, page: Page) -> str:
    """Throughput, stage times, seconds per image and failure reasons of one bulk output."""
    import pandas as pd

    table = source.table
    parts = [f"<h2>Bulk reconstruction: {_esc(source.uri)}</h2>"]
    if not len(table):
        return parts[0] + "<p>The manifest has no rows.</p>"
    counts = table["status"].value_counts().to_dict()
    seconds = table[[f"seconds_{s}" for s in BULK_STAGES]].astype(float)
    table = table.assign(seconds_total=seconds.sum(axis=1, min_count=1))
    finished = pd.to_datetime(table["finished_at"], utc=True)
    rows = []
    series = []
    for run_id, run in table.assign(finished=finished, run_id=table["run_id"].fillna("unknown")).groupby("run_id", sort=True):
        run = run.sort_values("finished")
        # A run's start: the earliest finish minus that input's own processing time.
        start = (run["finished"] - pd.to_timedelta(run["seconds_total"].fillna(0), unit="s")).min()
        elapsed = (run["finished"] - start).dt.total_seconds().to_numpy()
        span = float(elapsed.max()) if len(elapsed) else 0.0
        done = run["status"].isin(["ok", "failed"]).sum()
        rows.append([str(run_id), len(run), int((run["status"] == "ok").sum()), int((run["status"] == "failed").sum()),
                     int((run["status"] == "skipped").sum()), span, done / span if span > 0 else None,
                     float(run["seconds_total"].median()) if run["seconds_total"].notna().any() else None])
        series.append((str(run_id), np.concatenate([[0.0], elapsed]), np.arange(len(run) + 1, dtype=float)))
    parts.append(f"<p>{len(table)} manifest rows: " + ", ".join(f"{_esc(k)} {v}" for k, v in sorted(counts.items())) + ".</p>")
    parts.append(html_table(["run", "inputs", "ok", "failed", "skipped", "wall s", "images/s", "median s/image"], rows))
    parts.append('<div class="grid">')
    parts.append(_figure(line_chart(series, "Throughput: inputs finished over time", "seconds since the run started",
                                    "inputs finished", width=610)))
    ok = table[table["status"] == "ok"]
    means = [float(ok[f"seconds_{s}"].mean()) if len(ok) else None for s in BULK_STAGES]
    p90 = [float(ok[f"seconds_{s}"].quantile(0.9)) if len(ok) and ok[f"seconds_{s}"].notna().any() else None for s in BULK_STAGES]
    parts.append(_figure(bar_chart(list(BULK_STAGES), means, "Time per stage (mean, whisker to p90), ok inputs", "seconds", p90,
                                   width=610)))
    parts.append(_figure(histogram(ok["seconds_total"], "Seconds per image (all stages), ok inputs", "seconds", width=610)))
    parts.append("</div>")
    parts.append(_failures_table(table.rename(columns={"input_uri": "item"})))
    parts.append(_degraded_cases(ok, config, page))
    return "".join(parts)


def _degraded_cases(ok, config: ReportConfig, page: Page) -> str:
    """Ok rows made without a fitted body (the fallback model made the mesh): reasons, counts and
    the first `config.worst` previews, so a user sees what the second-best path gave."""
    if "body_error" not in ok or not ok["body_error"].notna().any():
        return ""
    degraded = ok[ok["body_error"].notna()]
    reasons = degraded["body_error"].str.split(":").str[0]
    rows = [[reason, len(group), f"{100 * len(group) / len(ok):.1f} %", str(group["body_error"].iloc[0])[:300]]
            for reason, group in degraded.groupby(reasons, sort=False)]
    parts = [f"<h3>Made without a fitted body ({len(degraded)} of {len(ok)} ok rows)</h3>",
             html_table(["reason", "count", "share of ok", "example"], rows), '<div class="cases">']
    for _, row in degraded.head(config.worst).iterrows():
        data = image_data_uri(row.get("preview_uri"), config.image_width)
        parts.append(f'<div class="case"><h4>{_esc(row["input_uri"])}</h4><p class="m">{_esc(str(row["body_error"])[:200])}</p>')
        if data is not None:
            page.counts["img"] += 1
            parts.append(f'<figure><img src="{data}" alt="preview"><figcaption>input | predicted normals | mesh</figcaption></figure>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _failures_table(table) -> str:
    """Failure classes with counts, share, an example message and item."""
    failed = table[table["status"] == "failed"]
    if not len(failed):
        return "<h3>Failures</h3><p>None.</p>"
    rows = []
    for error_class, group in failed.groupby(failed["error_class"].fillna("unknown"), sort=False):
        first = group.iloc[0]
        rows.append([str(error_class), len(group), f"{100 * len(group) / len(table):.1f} %",
                     str(first.get("error_message") or "")[:300], str(first.get("item") or "")])
    rows.sort(key=lambda r: -r[1])
    return "<h3>Failures</h3>" + html_table(["reason", "count", "share", "example message", "example"], rows)


def evaluation_section(source: Source, config: ReportConfig, page: Page) -> str:
    """Summary, metric distributions, failures and the worst cases of one evaluation."""
    from pipelines.common.formats import HIGHER_IS_BETTER, METRICS, beats_baseline, summarize

    table = source.table
    parts = [f"<h2>Evaluation: {_esc(source.uri)}</h2>"]
    if not len(table):
        return parts[0] + "<p>No results.</p>"
    summary = summarize(table)
    mode = str(table["mode"].iloc[0]) if "mode" in table else ""
    icp = bool(table["icp"].fillna(False).any()) if "icp" in table else False
    samples = int(table["num_samples"].dropna().iloc[0]) if "num_samples" in table and table["num_samples"].notna().any() else None
    parts.append(f"<p>{summary['pairs']} pairs ({_esc(mode)} mode): {summary['ok']} ok, {summary['failed']} failed. "
                 f"PIFuHD protocol, distances in cm, {_esc(_fmt(samples))} samples per surface, P2S prediction &rarr; "
                 f"ground truth, ICP {'on' if icp else 'off'}.</p>")
    methods = table["method"].fillna("model") if "method" in table else None
    if methods is not None:
        table = table[methods == "model"]
    ok = table[table["status"] == "ok"]
    baselines = summary.get("baselines") or {}
    rows = []
    for name in METRICS:
        values = ok[name].to_numpy(dtype=float) if len(ok) else np.zeros(0)
        values = values[np.isfinite(values)]
        better = "higher" if name in HIGHER_IS_BETTER else "lower"
        row = [name, better, *(([float(values.mean()), float(np.median(values)), float(values.min()), float(values.max())])
                               if len(values) else [None] * 4), len(values)]
        row += [base["metrics"][name]["mean"] for base in baselines.values()]
        rows.append(row)
    header = ["metric", "better", "mean", "median", "min", "max", "n", *(f"{b} baseline mean" for b in baselines)]
    parts.append(html_table(header, rows, numeric_from=2))
    for name in baselines:
        verdict = beats_baseline(summary, name)
        ratios = ", ".join(f"{_esc(k)} {v:.2f}x" for k, v in verdict["ratios"].items() if v is not None)
        parts.append(f"<p><b>Model / {_esc(name)} baseline on the same views: {ratios}: "
                     + ("the model beats the baseline." if verdict["beats"] else f"the model does NOT beat the {_esc(name)} baseline.")
                     + "</b></p>")
    parts.append('<div class="grid">')
    for name in METRICS:
        parts.append(_figure(histogram(ok[name] if len(ok) else [], name, name, width=400)))
    parts.append("</div>")
    parts.append(_failures_table(table.assign(item=table["key"])))
    parts.append(_worst_cases(ok, config, page))
    return "".join(parts)


def _worst_cases(ok, config: ReportConfig, page: Page) -> str:
    """The `config.worst` pairs with the largest Chamfer distance, with their images."""
    if not len(ok):
        return ""
    worst = ok.sort_values("chamfer_cm", ascending=False, na_position="first").head(config.worst)
    parts = [f"<h3>Worst {len(worst)} by Chamfer distance</h3>", '<div class="cases">']
    for _, row in worst.iterrows():
        metrics = ", ".join(f"{name} {_fmt(row.get(name))}" for name in ("chamfer_cm", "p2s_cm", "s2p_cm", "normal_image_error", "fscore_2cm"))
        parts.append(f'<div class="case"><h4>{_esc(row["key"])}</h4><p class="m">{_esc(metrics)}</p>')
        for label, column in (("input | predicted normals | mesh", "preview_uri"),
                              ("normal renders, yaw 0/90/180/270: truth (top), prediction (bottom)", "comparison_uri")):
            uri = row.get(column)
            if not isinstance(uri, str) or not uri:
                continue
            data = image_data_uri(uri, config.image_width)
            if data is None:
                parts.append(f"<p class=\"m\">{_esc(label)}: missing ({_esc(uri)})</p>")
                continue
            page.counts["img"] += 1
            parts.append(f'<figure><img src="{data}" alt="{_esc(label)}"><figcaption>{_esc(label)}</figcaption></figure>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def training_section(sources: list[Source]) -> str:
    """Loss and every validation metric against the step, one line per run (and stage)."""
    parts = ["<h2>Training</h2>"]
    rows, loss_series, val_names = [], [], []
    for source in sources:
        table = source.table.sort_values("step")
        stages = table["stage"].dropna().unique().tolist() if "stage" in table else []
        label = source.name + (f" ({'/'.join(map(str, stages))})" if stages else "")
        losses = table.dropna(subset=["loss"]) if "loss" in table else table.iloc[0:0]
        loss_series.append((label, losses["step"].to_numpy(dtype=float), losses["loss"].to_numpy(dtype=float)))
        for column in table.columns:
            if column.startswith("val_") and column not in val_names:
                val_names.append(column)
        last = table.iloc[-1]
        rows.append([label, source.uri, int(last["step"]), float(last["loss"]) if "loss" in last else None])
    parts.append(html_table(["run", "folder", "last step", "last loss"], rows, numeric_from=2))
    parts.append('<div class="grid">')
    parts.append(_figure(line_chart(loss_series, "Training loss", "step", "loss", width=610)))
    if val_names:
        for name in val_names:
            series = []
            for source in sources:
                if name in source.table:
                    t = source.table.dropna(subset=[name]).sort_values("step")
                    series.append((source.name, t["step"].to_numpy(dtype=float), t[name].to_numpy(dtype=float)))
            parts.append(_figure(line_chart(series, name, "step", name, width=610)))
    parts.append("</div>")
    return "".join(parts)


# ---- the page ------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px;word-break:break-all}
h3{font-size:15px;margin:18px 0 6px}h4{margin:4px 0;font-size:14px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:8px 0;display:inline-block;vertical-align:top}figcaption{font-size:12px;color:#555}
.grid,.cases{display:flex;flex-wrap:wrap;gap:8px}.case{border:1px solid #ddd;padding:8px;flex:0 1 600px}.m{color:#555;font-size:12px;margin:2px 0}
img{max-width:100%;image-rendering:auto;border:1px solid #eee}
svg.plot{border:1px solid #eee}svg text{font:11px system-ui,sans-serif;fill:#333}
svg .t{font-size:13px;font-weight:600;text-anchor:middle}svg .xl{text-anchor:middle}svg .yl{text-anchor:end}
svg .g{stroke:#eee}svg .a{stroke:#888}svg .lg{font-size:11px}
"""


def build_report(sources: list[Source], config: ReportConfig) -> tuple[str, dict]:
    """The HTML page of the sources, and how many plots (svg) and images (img) it holds."""
    page = Page()
    for source in sources:
        if source.kind == "manifest":
            page.sections.append(manifest_section(source, config, page))
    for source in sources:
        if source.kind == "evaluation":
            page.sections.append(evaluation_section(source, config, page))
    training = [s for s in sources if s.kind == "training"]
    if training:
        page.sections.append(training_section(training))
    body = "".join(page.sections)
    page.counts["svg"] = body.count("<svg ")
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    inputs = "".join(f"<li>{_esc(s.kind)}: {_esc(s.uri)}</li>" for s in sources)
    document = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # No request may leave the page: images are data URIs, styles inline, no scripts.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(config.title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_esc(config.title)}</h1><p class=\"m\">made {made} from:</p>"
        f"<ul class=\"m\">{inputs}</ul>{body}</body></html>\n"
    )
    return document, page.counts


def make_report(config: ReportConfig) -> dict:
    """Read every input, write the page to `config.output`; returns {"output", "svg", "img", "sources"}."""
    sources = [s for uri in config.inputs for s in load_sources(uri)]
    document, counts = build_report(sources, config)
    storage.write_bytes_atomic(config.output, document.encode("utf-8"))
    return {"output": config.output, **counts, "sources": [(s.kind, s.uri) for s in sources]}


# ---- command line --------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> ReportConfig:
    return build_config(ReportConfig, **config_values(args, ReportConfig))


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        result = make_report(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pifuhd report: error: {exc}", file=sys.stderr)
        return exit_codes.USAGE if isinstance(exc, ValueError) else exit_codes.UNUSABLE
    kinds = ", ".join(f"{kind} {uri}" for kind, uri in result["sources"])
    print(f"wrote {result['output']}: {result['svg']} plots, {result['img']} images ({kinds})")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add `report` to an argparse subparsers object (pipelines/cli.py)."""
    parser = subparsers.add_parser(
        "report",
        help="one self-contained HTML page: throughput, stage times, failures, metrics, training curves",
        description="INPUT: a `pifuhd reconstruct` output folder (or a manifest part), a `pifuhd evaluate` output "
        "folder (or its results.parquet), a training run folder (OUT/NAME) or a training root holding runs. "
        "The page embeds its plots (SVG) and images and opens offline.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=uri_argument)
    config_option(parser, "--output", ReportConfig, "output", aliases=("-o",), required=True, type=uri_argument,
                  help="the HTML file to write (local or s3://)")
    config_option(parser, "--title", ReportConfig, "title", help="the page title")
    config_option(parser, "--worst", ReportConfig, "worst", help="worst evaluation cases to show with images")
    parser.set_defaults(handler=_run, config=_config)
    return parser
