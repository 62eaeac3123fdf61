"""Writing the outputs of a sanitization pass (DESIGN 3).

``OUT_DIR/``
    ``cleaned.<ext>`` (or ``cleaned/`` shards for WebDataset): the input manifest in its
    own format, extra columns kept, dropped pairs removed, re-assigned captions replaced.
    ``image`` paths stay relative to the input's image root.
    ``decisions.parquet``: one row per input pair with every score.
    ``report.json``: first the model-quality verdict (``model_quality``: ``verdict``,
    a one-sentence ``message``, the metrics) and the pairs kept for review (``review``:
    count and the change proposed for each), then counts per action and reason, score
    statistics, GMM, model and settings, library versions, the input's sha256, seconds
    per stage.
    ``report.html``: the same, self-contained (inline SVG histograms, base64 thumbnails).

Every file is written to a temporary name in ``OUT_DIR`` and renamed into place.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from otcclip.models.atomic import atomic_write
from otcclip.models.decisions import ACTIONS, Decisions
from otcclip.models.progress import ProgressFn

LIBRARIES = ("otcclip", "torch", "open_clip_torch", "POT", "faiss-cpu", "faiss-gpu", "numpy",
             "scikit-learn", "pyarrow", "pillow")
COLORS = {"keep": "#2e7d32", "reassign": "#1565c0", "drop": "#c62828"}


@dataclass(frozen=True)
class OutputFiles:
    """Paths written by :func:`write_outputs`."""

    manifest: Path
    decisions: Path
    report_json: Path
    report_html: Path


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the results (absent ones skipped)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def decisions_table(manifest: Any, decisions: Decisions) -> pa.Table:
    """The ``decisions.parquet`` table: ids, captions before/after, every score."""
    n = len(manifest)
    if len(decisions) != n:
        raise ValueError(f"{len(decisions)} decisions for a manifest of {n} rows")
    caps = manifest.captions
    new = [caps[j] if j >= 0 else None for j in decisions.new_caption_index.tolist()]
    base = decisions.to_arrow()
    cols: dict[str, Any] = {
        "id": pa.array(manifest.ids, pa.string()),
        "action": base.column("action"),
        "reason": base.column("reason"),
        "detectors": base.column("detectors"),
        "original_caption": pa.array(caps, pa.string()),
        "new_caption": pa.array(new, pa.string()),
    }
    for name in base.column_names:
        if name not in cols:
            cols[name] = base.column(name)
    return pa.table(cols)


def cleaned_table(manifest: Any, decisions: Decisions) -> pa.Table:
    """Input table minus dropped rows, with re-assigned captions replaced."""
    table: pa.Table = manifest.table
    caps = manifest.captions
    new = [caps[j] if j >= 0 else c for j, c in zip(decisions.new_caption_index.tolist(), caps, strict=True)]
    idx = table.column_names.index("caption")
    table = table.set_column(idx, "caption", pa.array(new, pa.string()))
    keep = pa.array(decisions.action != "drop")
    return table.filter(keep)


def _stats(x: np.ndarray) -> dict[str, float | int | None]:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "p05": None, "p50": None, "p95": None, "max": None}
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "p05": float(q[0]), "p50": float(q[1]), "p95": float(q[2]), "max": float(x.max())}


SCORE_FIELDS = ("global_score", "ot_score", "fused_score", "best_fused_score", "p_clean")


def build_report(manifest: Any, decisions: Decisions, *, config: Any, model_info: dict[str, Any],
                 timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The content of ``report.json``."""
    counts = decisions.counts()
    stats: dict[str, Any] = {f: {"all": _stats(getattr(decisions, f))} for f in SCORE_FIELDS}
    for f in SCORE_FIELDS:
        for a in ACTIONS:
            stats[f][a] = _stats(getattr(decisions, f)[decisions.action == a])
    det: dict[str, int] = {}
    for s in decisions.detectors.tolist():
        for name in filter(None, str(s).split(",")):
            det[name] = det.get(name, 0) + 1
    review: dict[str, int] = {}
    for r in decisions.review_reason[decisions.review].tolist():
        review[str(r)] = review.get(str(r), 0) + 1
    return {
        "model_quality": decisions.model_quality,
        "review": {"pairs": int(decisions.review.sum()), "proposed": dict(sorted(review.items()))},
        "input": {"path": str(manifest.path), "format": manifest.format, "rows": len(manifest),
                  "sha256": manifest.sha256},
        "counts": counts,
        "detector_flags": det,
        "scores": stats,
        "gmm": decisions.gmm,
        "model": model_info,
        "settings": config.to_dict() if hasattr(config, "to_dict") else dict(vars(config)),
        "versions": library_versions(),
        "timings_s": timings or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _svg_histogram(values: dict[str, np.ndarray], title: str, bins: int = 40) -> str:
    """Overlaid per-action histograms as an inline SVG."""
    allv = np.concatenate([v[np.isfinite(v)] for v in values.values()] or [np.zeros(0)])
    w, h, pad = 520, 200, 30
    if len(allv) == 0:
        return f"<p>{html.escape(title)}: no finite values</p>"
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    hists = {a: np.histogram(v[np.isfinite(v)], bins=edges)[0] for a, v in values.items()}
    top = max(1, max(int(c.max()) for c in hists.values()))
    bw = (w - 2 * pad) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 40}" role="img">',
             f'<text x="{pad}" y="14" font-size="13">{html.escape(title)}</text>']
    for a, c in hists.items():
        for i, cnt in enumerate(c.tolist()):
            if cnt == 0:
                continue
            bh = (h - pad) * cnt / top
            parts.append(f'<rect x="{pad + i * bw:.1f}" y="{h - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                         f'fill="{COLORS.get(a, "#777")}" fill-opacity="0.5"><title>{a}: {cnt}</title></rect>')
    parts.append(f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#333"/>')
    parts.append(f'<text x="{pad}" y="{h + 15}" font-size="11">{lo:.3f}</text>')
    parts.append(f'<text x="{w - pad}" y="{h + 15}" font-size="11" text-anchor="end">{hi:.3f}</text>')
    lx = pad
    for a in hists:
        parts.append(f'<rect x="{lx}" y="{h + 24}" width="10" height="10" fill="{COLORS.get(a, "#777")}"/>'
                     f'<text x="{lx + 14}" y="{h + 33}" font-size="11">{a} ({len(values[a])})</text>')
        lx += 120
    parts.append("</svg>")
    return "".join(parts)


def _thumbnail(manifest: Any, row: int, size: int = 96) -> str:
    try:
        img = manifest.images.open(manifest.image_paths[row])
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=85)
        return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    except Exception:  # unreadable images are expected here (reason unreadable_image)
        return "<span>(unreadable)</span>"


def _examples(manifest: Any, decisions: Decisions, per_action: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    caps, ids = manifest.captions, manifest.ids
    rows_html = []
    for a in ("reassign", "drop", "keep"):
        rows = np.nonzero(decisions.action == a)[0]
        if len(rows) > per_action:
            rows = np.sort(rng.choice(rows, size=per_action, replace=False))
        for r in rows.tolist():
            j = int(decisions.new_caption_index[r])
            new = caps[j] if j >= 0 else ""
            rows_html.append(
                f"<tr><td>{_thumbnail(manifest, r)}</td><td>{html.escape(str(ids[r]))}</td>"
                f'<td style="color:{COLORS[a]}">{a}<br><small>{html.escape(str(decisions.reason[r]))}</small></td>'
                f"<td>{html.escape(caps[r])}</td><td>{html.escape(new)}</td>"
                f"<td>{decisions.fused_score[r]:.3f}</td><td>{decisions.best_fused_score[r]:.3f}</td>"
                f"<td>{decisions.p_clean[r]:.2f}</td></tr>")
    head = ("<tr><th>image</th><th>id</th><th>action</th><th>original caption</th><th>new caption</th>"
            "<th>own fused</th><th>best fused</th><th>p_clean</th></tr>")
    return f"<table>{head}{''.join(rows_html)}</table>"


def render_html(manifest: Any, decisions: Decisions, report: dict[str, Any], *, examples: int = 12,
                seed: int = 0) -> str:
    """A self-contained HTML report (no external resources)."""
    by_action = {a: decisions.fused_score[decisions.action == a] for a in ACTIONS}
    hists = [
        _svg_histogram(by_action, "own-pair fused score by action"),
        _svg_histogram({a: decisions.global_score[decisions.action == a] for a in ACTIONS}, "own-pair global cosine"),
        _svg_histogram({a: decisions.ot_score[decisions.action == a] for a in ACTIONS}, "own-pair OT score (1 - d_OT)"),
        _svg_histogram({a: decisions.p_clean[decisions.action == a] for a in ACTIONS}, "p_clean (GMM posterior)"),
    ]
    counts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                     for k, v in report["counts"]["reason"].items())
    acts = " · ".join(f"{a}: {n}" for a, n in report["counts"]["action"].items())
    meta = html.escape(json.dumps({k: report[k] for k in ("input", "model", "settings", "versions", "gmm",
                                                          "timings_s")}, indent=2, default=str))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>otcclip sanitize report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}}img{{image-rendering:pixelated;width:96px}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}</style></head><body>
<h1>Sanitization report</h1>
<p><strong>Model: {html.escape(str(report.get('model_quality', {}).get('verdict', 'not judged')))}.</strong> {html.escape(str(report.get('model_quality', {}).get('message', '')))} {report.get('review', {}).get('pairs', 0)} pairs kept for review.</p>
<p>{html.escape(str(report['input']['path']))} ({report['input']['rows']} pairs, {html.escape(report['input']['format'])},
sha256 <code>{report['input']['sha256'][:16]}…</code>)</p>
<h2>Decisions</h2><p>{acts}</p><table><tr><th>action/reason</th><th>pairs</th></tr>{counts}</table>
<h2>Scores</h2>{''.join(hists)}
<h2>Example pairs</h2>{_examples(manifest, decisions, examples, seed)}
<h2>Model, settings, versions</h2><pre>{meta}</pre>
</body></html>"""


def cleaned_name(manifest: Any) -> str:
    """``cleaned.<ext>`` for file manifests, ``cleaned`` (dir) / ``cleaned.tar`` for WebDataset."""
    p = Path(manifest.path)
    if manifest.format == "webdataset":
        return "cleaned.tar" if p.suffix == ".tar" else "cleaned"
    return f"cleaned{p.suffix}"


def write_outputs(
    manifest: Any,
    decisions: Decisions,
    out_dir: str | Path,
    *,
    config: Any,
    model_info: dict[str, Any],
    timings: dict[str, float] | None = None,
    progress: ProgressFn | None = None,
    examples: int = 12,
) -> OutputFiles:
    """Write the cleaned manifest, ``decisions.parquet``, ``report.json`` and ``report.html``.

    Parameters
    ----------
    manifest : Manifest
        The input (its format decides the cleaned manifest's).
    decisions : Decisions
        One row per manifest row.
    out_dir : path
        Created if missing; each file appears atomically.
    config : SanitizeConfig
        Recorded in the report.
    model_info : dict
        E.g. ``{"name": ..., "checkpoint": ...}``, recorded in the report.
    timings : dict, optional
        Seconds per stage; ``write`` is added.
    """
    from otcclip.models.manifest_writer import write_manifest

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtab = decisions_table(manifest, decisions)
    dec_path = atomic_write(out / "decisions.parquet", lambda t: pq.write_table(dtab, t))
    if progress is not None:
        progress("write", 1, 4)
    man_path = write_manifest(manifest, cleaned_table(manifest, decisions), out / cleaned_name(manifest))
    if progress is not None:
        progress("write", 2, 4)
    tim = dict(timings or {})
    report = build_report(manifest, decisions, config=config, model_info=model_info, timings=tim)
    page = render_html(manifest, decisions, report, examples=examples, seed=int(getattr(config, "seed", 0)))
    html_path = atomic_write(out / "report.html", lambda t: Path(t).write_text(page, encoding="utf-8"))
    if progress is not None:
        progress("write", 3, 4)
    tim["write"] = time.perf_counter() - t0
    report["timings_s"] = tim
    text = json.dumps(report, indent=2, default=str)
    json_path = atomic_write(out / "report.json", lambda t: Path(t).write_text(text, encoding="utf-8"))
    if progress is not None:
        progress("write", 4, 4)
    return OutputFiles(manifest=man_path, decisions=dec_path, report_json=json_path, report_html=html_path)
