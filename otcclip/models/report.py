"""Writing the outputs of a sanitization pass (DESIGN 3).

``OUT_DIR/``
    ``cleaned.<ext>`` (or ``cleaned/`` shards for WebDataset, with the input's shard and
    member names): the input manifest in its own format and column names, extra columns
    kept, dropped pairs removed, re-assigned captions replaced, provenance columns added
    (``original_caption``, ``otcclip_action``, ``otcclip_reason``, ``otcclip_p_clean``,
    ``otcclip_review``, ``otcclip_review_reason``; WebDataset: keys of the ``.json``
    member). ``image`` paths resolve from ``OUT_DIR``
    (relative to it, or copied below ``OUT_DIR/images``).
    ``decisions.parquet``: one row per input pair with every score.
    ``report.json``: first the model-quality verdict (``model_quality``: ``verdict``,
    a one-sentence ``message``, the metrics) and the pairs kept for review (``review``:
    count and the change proposed for each), the groups of repeated images
    (``duplicates``: the action, and per group its size, captions, members kept and what
    happened to the rest), then counts per action and reason, score
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
from otcclip.models.manifest_writer import PROVENANCE
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


def cleaned_table(manifest: Any, decisions: Decisions, *, provenance: bool = True) -> pa.Table:
    """Input table minus dropped rows, with re-assigned captions replaced.

    With ``provenance`` the columns ``original_caption``, ``otcclip_action``,
    ``otcclip_reason``, ``otcclip_p_clean``, ``otcclip_review`` (bool: kept because the
    engine was not sure of the change it proposed) and ``otcclip_review_reason`` (that
    proposal, empty elsewhere) are added (replaced if the input has them, e.g. a manifest
    cleaned before).
    """
    table: pa.Table = manifest.table
    caps = manifest.captions
    new = [caps[j] if j >= 0 else c for j, c in zip(decisions.new_caption_index.tolist(), caps, strict=True)]
    idx = table.column_names.index("caption")
    table = table.set_column(idx, "caption", pa.array(new, pa.string()))
    if provenance:
        p_clean = np.asarray(decisions.p_clean, dtype=np.float64)
        values = {
            "original_caption": pa.array(caps, pa.string()),
            "otcclip_action": pa.array([str(a) for a in decisions.action.tolist()], pa.string()),
            "otcclip_reason": pa.array([str(r) for r in decisions.reason.tolist()], pa.string()),
            "otcclip_p_clean": pa.array(np.round(p_clean, 6), pa.float64(), mask=~np.isfinite(p_clean)),
            "otcclip_review": pa.array(np.asarray(decisions.review, dtype=bool), pa.bool_()),
            "otcclip_review_reason": pa.array([str(r) for r in decisions.review_reason.tolist()], pa.string()),
        }
        for name in PROVENANCE:
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, values[name])
            else:
                table = table.append_column(name, values[name])
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
                 timings: dict[str, float] | None = None, input_name: str | None = None) -> dict[str, Any]:
    """The content of ``report.json``.

    ``input_name`` replaces the manifest's path in ``input`` (``input.name`` instead of
    ``input.path``): a service names the uploaded file, never where it stores it.
    """
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
        "duplicates": duplicates_report(manifest, decisions, config=config),
        "input": {**({"name": input_name} if input_name is not None else {"path": str(manifest.path)}),
                  "format": manifest.format, "rows": len(manifest), "sha256": manifest.sha256},
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


#: Groups listed in report.json / report.html (the largest first), and those with thumbnails.
MAX_DUP_GROUPS = 2000
MAX_DUP_THUMB_GROUPS = 200
#: Member ids and captions listed per group.
MAX_DUP_MEMBERS = 50


def duplicates_report(manifest: Any, decisions: Decisions, *, config: Any = None,
                      limit: int = MAX_DUP_GROUPS) -> dict[str, Any]:
    """The ``duplicates`` section of ``report.json``: the groups of repeated images.

    Returns
    -------
    dict
        ``action`` (the check's setting, None when it did not run), ``groups``, ``pairs``
        (members), ``dropped`` (reason ``duplicate``), ``review`` (members kept for review)
        and ``list``: per group (largest first, at most ``limit``) ``group``, ``size``,
        ``captions`` (``[caption, pairs]``, most frequent first), ``kept`` (ids of the
        members not dropped), ``outcome`` (pairs per ``action/reason``), ``ids`` (the
        first members' ids) and ``rows`` (the first four members' rows, for thumbnails).
    """
    st = getattr(getattr(config, "decisions", None), "duplicates", None)
    ran = config is None or "duplicates" in getattr(getattr(config, "decisions", None), "detectors", ("duplicates",))
    grp = np.asarray(decisions.dup_group)
    members = np.nonzero(grp >= 0)[0]
    out: dict[str, Any] = {
        "action": getattr(st, "action", None) if ran else None,
        "groups": int(len(np.unique(grp[members]))), "pairs": int(len(members)),
        "dropped": int((decisions.reason[members] == "duplicate").sum()),
        "review": int(decisions.review[members].sum()), "list": [],
    }
    if not len(members):
        return out
    caps, ids = manifest.captions, manifest.ids
    order = members[np.lexsort((members, grp[members]))]
    bounds = np.nonzero(np.r_[True, grp[order][1:] != grp[order][:-1], True])[0]
    groups = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    groups.sort(key=lambda rows: (-len(rows), int(grp[rows[0]])))
    for rows in groups[:limit]:
        texts: dict[str, int] = {}
        outcome: dict[str, int] = {}
        for r in rows.tolist():
            texts[caps[r]] = texts.get(caps[r], 0) + 1
            key = f"{decisions.action[r]}/{decisions.reason[r]}"
            outcome[key] = outcome.get(key, 0) + 1
        out["list"].append({
            "group": int(grp[rows[0]]), "size": int(len(rows)),
            "captions": [[c, k] for c, k in sorted(texts.items(), key=lambda ck: (-ck[1], ck[0]))][:MAX_DUP_MEMBERS],
            "kept": [str(ids[r]) for r in rows.tolist() if decisions.action[r] != "drop"][:MAX_DUP_MEMBERS],
            "outcome": dict(sorted(outcome.items())),
            "ids": [str(ids[r]) for r in rows.tolist()[:MAX_DUP_MEMBERS]],
            "rows": [int(r) for r in rows.tolist()[:4]],
        })
    return out


def _duplicates_html(manifest: Any, dup: dict[str, Any]) -> str:
    """The report's "Duplicate groups" section (thumbnails of up to 4 members per group)."""
    if not dup or not dup.get("pairs"):
        ran = "" if dup and dup.get("action") else " (the duplicates check did not run)"
        return f'<h2 id="duplicates">Duplicate groups</h2><p>No repeated images{ran}.</p>'
    rows = []
    for i, g in enumerate(dup["list"]):
        thumbs = "".join(f'<img class="thumb" alt="" src="{u}">' for r in g["rows"]
                         if i < MAX_DUP_THUMB_GROUPS and (u := _thumbnail_uri(manifest, r)))
        caps = "<br>".join(f"{html.escape(c)} <small>({k})</small>" for c, k in g["captions"])
        kept = ", ".join(html.escape(k) for k in g["kept"][:5]) + (" …" if len(g["kept"]) > 5 else "")
        outcome = "<br>".join(f"<code>{html.escape(k)}</code>: {v}" for k, v in g["outcome"].items())
        rows.append(f'<tr class="dup-group"><td>{g["group"]}</td><td>{g["size"]}</td><td>{thumbs}</td><td>{caps}</td>'
                    f'<td>{kept or "<span class=muted>none</span>"}</td><td>{outcome}</td></tr>')
    more = len(dup["list"]) < dup["groups"]
    return (f'<h2 id="duplicates">Duplicate groups</h2><p>{dup["groups"]} groups of repeated images, {dup["pairs"]} pairs; '
            f'action <code>{html.escape(str(dup["action"]))}</code>: {dup["dropped"]} dropped as <code>duplicate</code>, '
            f'{dup["review"]} kept for review{" (the largest groups shown)" if more else ""}.</p>'
            '<table id="duplicate-groups"><thead><tr><th>group</th><th>size</th><th>images</th><th>captions (pairs)</th>'
            f'<th>kept</th><th>outcome (action/reason: pairs)</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


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


#: What each reason code means (shown as the report's legend, for the codes that occur).
REASON_LEGEND: dict[str, str] = {
    "own_best": "kept: its own caption scores best among the shortlisted captions",
    "clean_score": "kept: another caption scores higher, but not by an unusual margin",
    "low_own_score": "re-assigned: own score is not clean-like and a clean-like caption beats it",
    "better_caption": "re-assigned: a clean-like caption beats its own by an unusual margin",
    "no_plausible_caption": "dropped: suspicious and no clean-like caption fits the image",
    "unreadable_image": "dropped: the image cannot be decoded",
    "image_burst": "detector: one (near-duplicate) image under many distinct captions (targeted poisoning)",
    "density": "detector: the pair is unlike the rest of the data (sparse neighbourhood)",
    "caption_burst": "detector: one caption on many images, this image an outlier among them",
    "trigger_sensitivity": "detector: the score collapses when a possible trigger is removed (backdoor); dropped (with abstain on, only with calibrated score evidence)",
    "collapse": "detector: images of different content packed abnormally tight by the model under one caption "
                "class (a learnt backdoor, whatever its trigger)",
    "duplicates": "check: the image is repeated (exact or near duplicate) in the data; see Duplicate groups",
    "duplicate": "dropped: a repeated image that its group's action removes (keep_one keeps the best-matching member)",
    "review": "kept for review: the engine was not sure of the change it proposed",
}
#: Rows with thumbnails in report.html (the most suspicious first); the rest show none.
MAX_THUMBNAILS = 1000
#: Rows of the review table in report.html (the most suspicious first).
MAX_REVIEW_ROWS = 20_000


def _thumbnail_uri(manifest: Any, row: int, size: int = 64) -> str | None:
    try:
        img = manifest.images.open(manifest.image_paths[row])
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=80)
        return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"
    except Exception:  # unreadable images are expected here (reason unreadable_image)
        return None


def review_rows(manifest: Any, decisions: Decisions, *, thumbnails: int = MAX_THUMBNAILS,
                limit: int = MAX_REVIEW_ROWS) -> list[dict[str, Any]]:
    """The changed, flagged or review-marked pairs, most suspicious first, as JSON-ready dicts.

    Suspicion orders by ``p_clean`` ascending (NaN, e.g. unreadable, first), then by the
    margin of the best caption over the pair's own (``best_fused - own fused``) descending.
    The first ``thumbnails`` rows carry a small JPEG data URI (``thumb``). ``new_caption``
    is the caption a re-assigned pair now has (None otherwise); ``proposed_caption`` the
    best candidate of a pair kept for review whose unsure proposal was a re-assignment
    (None otherwise): it was not applied.
    """
    n = len(decisions)
    flagged = np.array([bool(str(d)) for d in decisions.detectors.tolist()], dtype=bool) if n else np.zeros(0, bool)
    review = np.asarray(decisions.review, dtype=bool)  # kept, but a change was proposed: the user decides
    rows = np.nonzero((decisions.action != "keep") | flagged | review)[0]
    p = np.asarray(decisions.p_clean, dtype=np.float64)[rows]
    margin = (np.asarray(decisions.best_fused_score, np.float64) - np.asarray(decisions.fused_score, np.float64))[rows]
    order = np.lexsort((-np.nan_to_num(margin, nan=np.inf), np.nan_to_num(p, nan=-1.0)))
    rows = rows[order][:limit]
    caps, ids = manifest.captions, manifest.ids
    labels = manifest.labels if "label" in manifest.table.column_names else None

    def num(x: Any) -> float | None:
        v = float(x)
        return round(v, 4) if np.isfinite(v) else None

    out = []
    for rank, r in enumerate(rows.tolist()):
        j = int(decisions.new_caption_index[r])
        action = str(decisions.action[r])
        # a pair kept for review keeps its own caption; a re-assignment it was not sure of
        # is shown as the proposal (the best candidate), apart from what was applied
        best = int(decisions.best_caption_index[r])
        proposed = (caps[best] if review[r] and best >= 0 and best != j
                    and str(decisions.review_reason[r]).startswith("reassign") else None)
        out.append({
            "id": str(ids[r]), "action": action, "reason": str(decisions.reason[r]),
            "detectors": str(decisions.detectors[r]), "review_reason": str(decisions.review_reason[r]),
            "caption": caps[r], "new_caption": caps[j] if j >= 0 and action == "reassign" else None,
            "proposed_caption": proposed,
            "label": None if labels is None else labels[r],
            "p_clean": num(decisions.p_clean[r]), "own": num(decisions.fused_score[r]),
            "best": num(decisions.best_fused_score[r]),
            "thumb": _thumbnail_uri(manifest, r) if rank < thumbnails else None,
        })
    return out


def _transitions(decisions: Decisions, captions: list[str], top: int = 50) -> list[tuple[str, str, int]]:
    """The most frequent ``original caption -> new caption`` re-assignments."""
    counts: dict[tuple[str, str], int] = {}
    for r in np.nonzero(decisions.action == "reassign")[0].tolist():
        j = int(decisions.new_caption_index[r])
        if j >= 0:
            key = (captions[r], captions[j])
            counts[key] = counts.get(key, 0) + 1
    return [(a, b, c) for (a, b), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def _kv_table(obj: Any) -> str:
    """A small key/value table of a JSON-like object (nested values as JSON)."""
    if not isinstance(obj, dict):
        return f"<p>{html.escape(str(obj))}</p>"
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(v if isinstance(v, str) else json.dumps(v, default=str))}</td></tr>"
                    for k, v in obj.items())
    return f"<table class=kv>{cells}</table>"


_APP_JS = r"""
const DATA = JSON.parse(document.getElementById('review-data').textContent);
const PAGE = 50;
let page = 0;
const $ = (id) => document.getElementById(id);
function esc(s) { return s == null ? '' : String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c])); }
function fill(sel, values) {
  for (const v of [...new Set(values)].filter(v => v != null && v !== '').sort()) {
    const o = document.createElement('option'); o.value = v; o.textContent = v; sel.appendChild(o);
  }
}
fill($('f-action'), DATA.map(r => r.action));
fill($('f-reason'), DATA.flatMap(r => [r.reason, ...r.detectors.split(',')]));
fill($('f-label'), DATA.map(r => r.label));
if (!DATA.some(r => r.label != null)) $('f-label-box').style.display = 'none';
function selected() {
  const a = $('f-action').value, re = $('f-reason').value, l = $('f-label').value, q = $('f-text').value.toLowerCase();
  return DATA.filter(r => (!a || r.action === a)
    && (!re || r.reason === re || r.detectors.split(',').includes(re))
    && (!l || String(r.label) === l)
    && (!q || (r.caption + ' ' + (r.new_caption || '') + ' ' + (r.proposed_caption || '') + ' ' + r.id).toLowerCase().includes(q)));
}
function render() {
  const rows = selected();
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  page = Math.min(page, pages - 1);
  const part = rows.slice(page * PAGE, page * PAGE + PAGE);
  $('review-body').innerHTML = part.map(r => `<tr class="row" data-id="${esc(r.id)}">
    <td>${r.thumb ? `<img class="thumb" alt="" src="${r.thumb}">` : '<span class="muted">-</span>'}</td>
    <td>${esc(r.id)}</td><td class="act-${esc(r.action)}">${esc(r.action)}</td>
    <td><code>${esc(r.reason)}</code>${r.detectors ? `<br><small>${esc(r.detectors)}</small>` : ''}${r.review_reason ? `<br><small>proposed: ${esc(r.review_reason)}</small>` : ''}</td>
    <td>${esc(r.caption)}</td><td>${r.new_caption != null ? esc(r.new_caption) : r.proposed_caption != null ? `<small class="muted">proposed, not applied:</small><br><i>${esc(r.proposed_caption)}</i>` : ''}</td>
    <td>${r.p_clean == null ? '' : r.p_clean.toFixed(3)}</td><td>${r.own == null ? '' : r.own.toFixed(3)}</td>
    <td>${r.best == null ? '' : r.best.toFixed(3)}</td></tr>`).join('');
  $('page-info').textContent = rows.length ? `${page * PAGE + 1}-${page * PAGE + part.length} of ${rows.length}` : '0 pairs';
  $('prev').disabled = page === 0; $('next').disabled = page >= pages - 1;
}
function csv(rows) {
  const cols = ['id', 'action', 'reason', 'detectors', 'review_reason', 'label', 'caption', 'new_caption', 'proposed_caption', 'p_clean', 'own', 'best'];
  const q = v => v == null ? '' : /[",\n\r]/.test(String(v)) ? '"' + String(v).replace(/"/g, '""') + '"' : String(v);
  return [cols.join(','), ...rows.map(r => cols.map(c => q(r[c])).join(','))].join('\n') + '\n';
}
for (const id of ['f-action', 'f-reason', 'f-label']) $(id).addEventListener('change', () => { page = 0; render(); });
$('f-text').addEventListener('input', () => { page = 0; render(); });
$('prev').addEventListener('click', () => { page--; render(); });
$('next').addEventListener('click', () => { page++; render(); });
$('export').addEventListener('click', () => {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([csv(selected())], {type: 'text/csv'}));
  a.download = 'otcclip-review.csv'; document.body.appendChild(a); a.click(); a.remove();
});
render();
"""


def render_html(manifest: Any, decisions: Decisions, report: dict[str, Any], *, examples: int = MAX_THUMBNAILS) -> str:
    """A self-contained HTML report (no external resources): summary, legend, histograms and a
    review table of the changed, flagged and review-marked pairs (filters, paging, thumbnails, CSV export).

    ``examples`` caps the thumbnails. Fields other parts add to ``report`` (a model-quality
    verdict, review decisions) are shown when present.
    """
    by_action = {a: decisions.fused_score[decisions.action == a] for a in ACTIONS}
    hists = [
        _svg_histogram(by_action, "own-pair fused score by action"),
        _svg_histogram({a: decisions.global_score[decisions.action == a] for a in ACTIONS}, "own-pair global cosine"),
        _svg_histogram({a: decisions.ot_score[decisions.action == a] for a in ACTIONS}, "own-pair OT score (1 - d_OT)"),
        _svg_histogram({a: decisions.p_clean[decisions.action == a] for a in ACTIONS}, "p_clean (GMM posterior)"),
    ]
    counts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                     for k, v in report["counts"]["reason"].items())
    acts = " · ".join(f'<b class="act-{html.escape(a)}">{a}</b>: {n}' for a, n in report["counts"]["action"].items())
    used = {k.split("/", 1)[1] for k in report["counts"]["reason"]} | set(report.get("detector_flags", {}))
    legend = "".join(f"<tr><td><code>{html.escape(c)}</code></td><td>{html.escape(t)}</td></tr>"
                     for c, t in REASON_LEGEND.items() if c in used)
    extra = ""
    for key, title in (("model_quality", "Model quality"), ("quality", "Model quality"), ("verdict", "Verdict"),
                       ("review", "Review")):
        if key in report and report[key] not in (None, {}, []):
            extra += f"<h2>{title}</h2>{_kv_table(report[key])}"
    trans = _transitions(decisions, manifest.captions)
    trans_html = ("".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{c}</td></tr>" for a, b, c in trans)
                  or "<tr><td colspan=3>no re-assignments</td></tr>")
    data = json.dumps(review_rows(manifest, decisions, thumbnails=examples), ensure_ascii=False).replace("</", "<\\/")
    meta = html.escape(json.dumps({k: report[k] for k in ("input", "model", "settings", "versions", "gmm",
                                                          "timings_s") if k in report}, indent=2, default=str))
    src = str(report["input"].get("name") or Path(str(report["input"].get("path", ""))).name)
    run = _run_line(report)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>otcclip sanitize report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px;text-align:left}}
img.thumb{{image-rendering:pixelated;width:64px;height:64px;object-fit:contain}}
.act-keep{{color:{COLORS['keep']}}}.act-reassign{{color:{COLORS['reassign']}}}.act-drop{{color:{COLORS['drop']}}}
.muted{{color:#999}}.controls{{margin:.5em 0;display:flex;gap:1em;flex-wrap:wrap;align-items:center}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}table.kv th{{background:#f6f6f6}}</style></head><body>
<h1>Sanitization report</h1>
<p>{html.escape(src)} ({report['input']['rows']} pairs, {html.escape(report['input']['format'])},
sha256 <code>{report['input']['sha256'][:16]}…</code>)</p>
{run}
<h2>Summary</h2><p>{acts}</p>
{extra}
<h2>Reasons</h2><table><tr><th>action/reason</th><th>pairs</th></tr>{counts}</table>
<h3>Legend</h3><table id="legend">{legend}</table>
<h2>Pairs to review</h2>
<p>Changed, flagged and review-marked pairs, most suspicious first (lowest <code>p_clean</code>, then the widest margin of the best caption over the own one).</p>
<div class="controls">
<label>action <select id="f-action"><option value="">all</option></select></label>
<label>reason <select id="f-reason"><option value="">all</option></select></label>
<label id="f-label-box">class <select id="f-label"><option value="">all</option></select></label>
<label>text <input id="f-text" type="search" placeholder="caption or id"></label>
<button id="prev">‹ prev</button><span id="page-info"></span><button id="next">next ›</button>
<button id="export">export CSV</button></div>
<table id="review"><thead><tr><th>image</th><th>id</th><th>action</th><th>reason</th><th>caption</th><th>new caption</th>
<th>p_clean</th><th>own fused</th><th>best fused</th></tr></thead><tbody id="review-body"></tbody></table>
{_duplicates_html(manifest, report.get("duplicates", {}))}
<h2>Caption transitions</h2><table id="transitions"><tr><th>caption</th><th>re-assigned to</th><th>pairs</th></tr>{trans_html}</table>
<h2>Scores</h2>{''.join(hists)}
<h2>Model, settings, versions</h2><pre>{meta}</pre>
<script type="application/json" id="review-data">{data}</script>
<script>{_APP_JS}</script>
</body></html>"""


def _run_line(report: dict[str, Any]) -> str:
    """The model and the seconds per stage, as one line of the report's header."""
    model = report.get("model") or {}
    name = model.get("name") or "unnamed model"
    how = ("checkpoint " + Path(str(model["checkpoint"])).name if model.get("checkpoint")
           else f"pretrained {model['pretrained']}" if model.get("pretrained")
           else "random init" if model.get("random_init") else "")
    stages = " · ".join(f"{html.escape(str(k))} {float(v):.2f} s" for k, v in (report.get("timings_s") or {}).items())
    return (f'<p id="run">model <b>{html.escape(str(name))}</b>{" (" + html.escape(how) + ")" if how else ""}'
            f'{"; stages: " + stages if stages else ""}</p>')


def cleaned_name(manifest: Any) -> str:
    """``cleaned.<ext>`` for file manifests, ``cleaned`` (dir) / ``cleaned.tar`` for WebDataset."""
    p = Path(manifest.path)
    if manifest.format == "webdataset":
        return "cleaned.tar" if p.suffix == ".tar" else "cleaned"
    if p.is_dir():  # a directory of Parquet files
        return "cleaned.parquet"
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
    examples: int = MAX_THUMBNAILS,
    provenance: bool = True,
    copy_images: bool = False,
    input_name: str | None = None,
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
    provenance : bool
        Add the provenance columns to the cleaned manifest (:func:`cleaned_table`).
    copy_images : bool
        Copy the kept images below ``out_dir/images`` instead of referencing them relative
        to ``out_dir`` (:func:`~otcclip.models.manifest_writer.relocate_images`).
    input_name : str, optional
        How the report names the input instead of its path (:func:`build_report`).
    """
    from otcclip.models.manifest_writer import relocate_images, write_manifest

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtab = decisions_table(manifest, decisions)
    dec_path = atomic_write(out / "decisions.parquet", lambda t: pq.write_table(dtab, t))
    if progress is not None:
        progress("write", 1, 4)
    cleaned = relocate_images(manifest, cleaned_table(manifest, decisions, provenance=provenance), out, copy=copy_images)
    man_path = write_manifest(manifest, cleaned, out / cleaned_name(manifest))
    if progress is not None:
        progress("write", 2, 4)
    tim = dict(timings or {})
    report = build_report(manifest, decisions, config=config, model_info=model_info, timings=tim, input_name=input_name)
    page = render_html(manifest, decisions, report, examples=examples)
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
