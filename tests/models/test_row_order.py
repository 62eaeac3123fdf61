"""The same pairs in any row order give the same decisions (docs/method.md, "Row order")."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from otcclip.models.config import OTSettings
from otcclip.models.config.detectors import DecisionSettings
from otcclip.models.config.sanitize import IndexSettings
from otcclip.models.decisions import fit_p_clean
from otcclip.models.manifest import read_manifest
from otcclip.models.sanitize import SanitizeConfig, sanitize
from otcclip.models.shortlist import build_index, content_order
from tests.models.layouts import CLASSES, jpg


def test_gmm_fit_ignores_row_order() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.3, 0.02, 400), rng.normal(0.1, 0.03, 100)])
    p1, info1 = fit_p_clean(x, sample=150, seed=3)
    perm = rng.permutation(len(x))
    p2, info2 = fit_p_clean(x[perm], sample=150, seed=3)
    assert info1 == info2
    np.testing.assert_array_equal(p1(x), p2(x))


def test_ivf_index_ignores_row_order() -> None:
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((600, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    perm = rng.permutation(len(xb))
    ivf = IndexSettings(exact_threshold=10, factory="IVF16,Flat", nprobe=2)
    np.testing.assert_array_equal(xb[content_order(xb)], xb[perm][content_order(xb[perm])])
    a = build_index(xb, settings=ivf, use_gpu=False, seed=0)
    b = build_index(xb[perm], settings=ivf, use_gpu=False, seed=0)
    q = xb[:50]
    sa, ia = a.search(q, 5)
    sb, ib = b.search(q, 5)
    np.testing.assert_allclose(sa, sb, atol=1e-6)
    assert (ia == perm[ib]).all()  # the same captions (b's rows are xb[perm])


def _manifest(root: Path, order: list[int]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    out = root / "m.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "caption"])
        for i in order:
            (root / "img" / f"{i:03d}.jpg").write_bytes(jpg(i))
            w.writerow([f"p{i}", f"img/{i:03d}.jpg", f"a photo of a {CLASSES[i % 3]} seen from angle {i}"])
    return out


def test_decisions_identical_under_row_shuffle(tmp_path: Path, tiny_bundle) -> None:
    n = 150
    # small thresholds so that the IVF quantiser, the GMM sample and the detectors' IVF all take part
    cfg = SanitizeConfig(k=4, batch_size=16, shard_size=64, device="cpu", ot=OTSettings(iters=20),
                         index=IndexSettings(exact_threshold=8, nprobe=2),
                         decisions=DecisionSettings(gmm_sample=100))
    order = list(range(n))
    shuffled = list(np.random.default_rng(5).permutation(n))
    runs, p_clean = [], []
    for name, rows in (("a", order), ("b", shuffled)):
        m = read_manifest(_manifest(tmp_path / name, rows))
        d = sanitize(m, tiny_bundle, config=cfg).decisions
        caps = m.captions
        runs.append({m.ids[r]: (str(d.action[r]), str(d.reason[r]),
                                caps[int(d.new_caption_index[r])] if d.new_caption_index[r] >= 0 else None)
                     for r in range(n)})
        p_clean.append({m.ids[r]: float(d.p_clean[r]) for r in range(n)})
    assert runs[0] == runs[1]
    # encoder batches hold other rows, so scores agree to float rounding only
    assert max(abs(p_clean[0][k] - p_clean[1][k]) for k in p_clean[0]) < 1e-3
