"""End-of-run summary without Grafana: ``summary.md`` and ``summary.png`` in the run folder.

    python -m cluster.summary runs/<name>      # or write_summary(run_dir) at the end of a run

Reads ``runs/<name>/metrics.jsonl`` (docs/INTERFACES.md: one object per line with ``stage``,
``split``, ``epoch``, ``step``, ``time`` and loss-dict keys such as ``ssim/x8``). The table
holds, per stage, the last logged value of every per-scale metric for train and val; the
plot shows loss, SSIM, CE (and prior accuracy) per scale over steps, one row per stage.
A truncated last line (a run killed mid-write) is skipped, not fatal.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from facesr.vocab import SCALES
from shards.store import ObjectPath, path as store_path

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
BOOKKEEPING = {"stage", "split", "epoch", "step", "time"}
TITLES = {"ssim": "SSIM", "ce": "CE", "acc": "Prior acc", "psnr": "PSNR (dB)", "loss": "Loss"}
ORDER = ("ssim", "psnr", "ce", "acc")  # table columns / plot panels first, others after
PLOTTED = ("ssim", "ce", "acc")  # per-scale panels beside the loss


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl in file (= time) order; malformed lines are skipped."""
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and "stage" in row and "split" in row:
            row["stage"] = str(row["stage"])  # the Recorder writes 1 | 2; other writers may use names
            rows.append(row)
        else:
            bad += 1
    if bad:
        log.warning("summary: skipped %d malformed line(s) in %s", bad, path)
    return rows


def _stages(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["stage"] for r in rows))


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def final_values(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(stage, split) -> {key: last logged value}."""
    final: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        slot = final.setdefault((r["stage"], r["split"]), {})
        slot.update({k: v for k, v in r.items() if k not in BOOKKEEPING and _numeric(v)})
    return final


def _families(keys) -> list[str]:
    """Per-scale metric families present among ``keys``, in display order."""
    found = {k.split("/", 1)[0] for k in keys if "/" in k and k.split("/", 1)[1] in SCALES}
    return [f for f in ORDER if f in found] + sorted(found - set(ORDER))


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def render_markdown(name: str, rows: list[dict]) -> str:
    """Per stage: a scale x (metric, split) table of final values, then final plain metrics."""
    final = final_values(rows)
    last = rows[-1]
    when = datetime.fromtimestamp(last.get("time", 0), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Summary: {name}", "",
           f"{len(rows)} records; stages {', '.join(_stages(rows))}; last record: stage "
           f"`{last['stage']}`, epoch {last.get('epoch', '?')}, step {last.get('step', '?')}, {when}.",
           ""]
    for stage in _stages(rows):
        per_split = {s: final.get((stage, s), {}) for s in SPLITS}
        columns = [(fam, split) for fam in _families(set().union(*per_split.values()))
                   for split in SPLITS if any(f"{fam}/{sc}" in per_split[split] for sc in SCALES)]
        out += [f"## Stage `{stage}`: final metrics per scale", ""]
        if columns:
            out.append("| scale | " + " | ".join(f"{TITLES.get(f, f)} {s}" for f, s in columns) + " |")
            out.append("|---" * (len(columns) + 1) + "|")
            for scale in SCALES:
                cells = [_fmt(per_split[s].get(f"{f}/{scale}")) for f, s in columns]
                out.append(f"| {scale} | " + " | ".join(cells) + " |")
            out.append("")
        plain = [(k, s, v) for s in SPLITS for k, v in sorted(per_split[s].items()) if "/" not in k]
        if plain:
            out += ["| metric | split | final |", "|---|---|---|"]
            out += [f"| {k} | {s} | {_fmt(v)} |" for k, s, v in plain]
            out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str = "") -> dict[str, int]:
    """Loss and per-scale SSIM/CE/accuracy over steps; one row per stage; train solid, val dashed.

    Returns the number of curves drawn per ``"<stage>/<panel>"``."""
    stages = _stages(rows)
    panels = {st: ["loss"] + [f for f in _families(k for r in rows if r["stage"] == st for k in r)
                              if f in PLOTTED] for st in stages}
    ncols = max(len(p) for p in panels.values())
    fig = Figure(figsize=(4.5 * ncols, 3.2 * len(stages)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(stages), ncols, squeeze=False)
    colors = {sc: f"C{i}" for i, sc in enumerate(SCALES)}
    drawn: dict[str, int] = {}
    for i, stage in enumerate(stages):
        for j, fam in enumerate(panels[stage]):
            ax = axes[i][j]
            drawn[f"{stage}/{fam}"] = 0
            keys = [("loss", None)] if fam == "loss" else [(f"{fam}/{sc}", sc) for sc in SCALES]
            for key, scale in keys:
                for split, style in (("train", "-"), ("val", "--o")):
                    pts = [(r["step"], r[key]) for r in rows if r["stage"] == stage
                           and r["split"] == split and _numeric(r.get(key))]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, style, color=colors.get(scale, "k"), markersize=3,
                                linewidth=1, label=f"{scale or ''} {split}".strip())
                        drawn[f"{stage}/{fam}"] += 1
            ax.set_title(f"{TITLES.get(fam, fam)} — {stage}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if drawn[f"{stage}/{fam}"]:
                ax.legend(fontsize=7)
        for j in range(len(panels[stage]), ncols):
            axes[i][j].set_visible(False)
    if title:
        fig.suptitle(title)
    if isinstance(path, ObjectPath):  # matplotlib writes files or streams: render, then one PUT
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        path.write_bytes(buf.getvalue())
    else:
        fig.savefig(path, dpi=100)
    return drawn


def write_summary(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.png`` next to ``metrics.jsonl``; return their paths (a run folder or URI)."""
    run_dir = store_path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"no metrics in {run_dir / 'metrics.jsonl'}")
    md, png = run_dir / "summary.md", run_dir / "summary.png"
    md.write_text(render_markdown(run_dir.name, rows))
    plot(rows, png, title=run_dir.name)
    return md, png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="runs/<name> (or s3://bucket/prefix/<name>) holding metrics.jsonl")
    args = p.parse_args(argv)
    md, png = write_summary(args.run_dir)
    print(f"{md}\n{png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
