"""Outputs of a pass (cleaned manifest, decisions.parquet, report.json/html) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from otcclip.cli import main
from otcclip.models.checkpoint import save_checkpoint
from otcclip.models.config import OTSettings
from otcclip.models.manifest import read_manifest
from otcclip.models.report import write_outputs
from otcclip.models.sanitize import SanitizeConfig, sanitize
from tests.models.test_sanitize import make_manifest

CFG = SanitizeConfig(k=4, batch_size=8, shard_size=10, device="cpu", ot=OTSettings(iters=30))


def test_write_outputs(tmp_path: Path, tiny_bundle) -> None:
    man = read_manifest(make_manifest(tmp_path))
    res = sanitize(man, tiny_bundle, config=CFG)
    d = res.decisions
    # force one re-assignment so the caption replacement is exercised
    d.action[0], d.new_caption_index[0] = "reassign", 1
    files = write_outputs(man, d, tmp_path / "out", config=CFG, model_info={"name": "otc-micro"}, timings=res.timings)

    cleaned = read_manifest(files.manifest, local=True)  # images resolve from the output folder
    assert files.manifest.name == "cleaned.csv"
    keep = d.action != "drop"
    assert len(cleaned) == int(keep.sum())
    assert "source" in cleaned.table.column_names  # extra columns kept
    assert cleaned.ids == [i for i, k in zip(man.ids, keep, strict=True) if k]
    assert cleaned.captions[0] == man.captions[1]
    assert cleaned.images.read_bytes(cleaned.image_paths[0]) == man.images.read_bytes(man.image_paths[0])
    prov = cleaned.table.select(["original_caption", "otcclip_action", "otcclip_reason", "otcclip_p_clean"]).to_pylist()
    assert prov[0]["original_caption"] == man.captions[0] and prov[0]["otcclip_action"] == "reassign"
    kept = [r for r, k in enumerate(keep) if k]
    assert [p["otcclip_reason"] for p in prov] == [str(d.reason[r]) for r in kept]
    assert all(abs(float(p["otcclip_p_clean"]) - float(d.p_clean[r])) < 1e-5 for p, r in zip(prov, kept, strict=True))
    for f in (tmp_path / "out").iterdir():  # normal modes, not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o644, f

    bare = write_outputs(man, d, tmp_path / "bare", config=CFG, model_info={}, provenance=False, copy_images=True)
    again = read_manifest(bare.manifest)  # copied images: no '..' needed
    assert "otcclip_action" not in again.table.column_names
    assert all(p.startswith("images/") for p in again.image_paths)
    assert again.images.read_bytes(again.image_paths[1]) == man.images.read_bytes(man.image_paths[1])

    tab = pq.read_table(files.decisions)
    assert tab.num_rows == len(man)
    for col in ("id", "action", "reason", "original_caption", "new_caption", "global_score", "ot_score",
                "fused_score", "p_clean"):
        assert col in tab.column_names
    rows = tab.to_pylist()
    assert rows[5]["action"] == "drop" and rows[5]["reason"] == "unreadable_image" and rows[5]["new_caption"] is None
    assert rows[0]["new_caption"] == man.captions[1] and rows[0]["original_caption"] == man.captions[0]

    rep = json.loads(files.report_json.read_text())
    assert sum(rep["counts"]["action"].values()) == len(man)
    assert rep["input"]["sha256"] == man.sha256
    assert rep["settings"]["k"] == 4 and rep["model"]["name"] == "otc-micro"
    assert {"torch", "POT", "numpy"} <= set(rep["versions"])
    assert {"encode", "ot", "decide", "write"} <= set(rep["timings_s"])
    page = files.report_html.read_text()
    assert "<svg" in page and "data:image/jpeg;base64," in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_write_outputs_refuses_mismatched_decisions(tmp_path: Path, tiny_bundle) -> None:
    man = read_manifest(make_manifest(tmp_path))
    small = read_manifest(make_manifest(tmp_path / "small", n=6))
    d = sanitize(small, tiny_bundle, config=CFG).decisions
    with pytest.raises(ValueError, match="decisions for a manifest"):
        write_outputs(man, d, tmp_path / "out", config=CFG, model_info={})
    assert not (tmp_path / "out" / "decisions.parquet").exists()


def test_cli_sanitize_end_to_end_and_bad_input(tmp_path: Path, tiny_bundle, capsys) -> None:
    man = make_manifest(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tiny_bundle, ckpt, meta={})
    out = tmp_path / "out"
    rc = main(["sanitize", str(man), "--checkpoint", str(ckpt), "--out", str(out), "--k", "4", "--batch-size", "8",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert {"cleaned.csv", "decisions.parquet", "report.json", "report.html"} <= {p.name for p in out.iterdir()}
    assert "pairs/s" in capsys.readouterr().out

    def err(*argv: str) -> str:
        assert main(["sanitize", *argv]) == 2
        return capsys.readouterr().err

    assert "manifest not found" in err(str(tmp_path / "nope.csv"), "--checkpoint", str(ckpt), "--out", str(out))
    assert "not a checkpoint directory" in err(str(man), "--checkpoint", str(tmp_path), "--out", str(out))
    assert "alpha" in err(str(man), "--checkpoint", str(ckpt), "--out", str(out), "--alpha", "3")
    bad = tmp_path / "data" / "bad.csv"
    bad.write_text("id,image\n1,img/000.jpg\n")
    assert "caption" in err(str(bad), "--checkpoint", str(ckpt), "--out", str(out))
    assert np.isfinite(pq.read_table(out / "decisions.parquet").column("p_clean").to_numpy()).all()


def test_review_table_lists_the_pairs_marked_for_review(tmp_path: Path, tiny_bundle) -> None:
    from otcclip.models.report import review_rows

    man = read_manifest(make_manifest(tmp_path))
    d = sanitize(man, tiny_bundle, config=CFG).decisions
    # a kept pair with no detector flag whose proposed change lacked evidence (a weak model's)
    r = next(i for i in range(len(man)) if d.action[i] == "keep")
    d.detectors[r], d.review[r], d.review_reason[r] = "", True, "reassign/low_own_score: weak model"
    listed = {row["id"]: row for row in review_rows(man, d)}
    assert man.ids[r] in listed and listed[man.ids[r]]["review_reason"] == "reassign/low_own_score: weak model"
    plain = [i for i in range(len(man)) if d.action[i] == "keep" and not d.review[i] and not str(d.detectors[i])]
    assert not {man.ids[i] for i in plain} & set(listed)


def test_review_table_shows_an_unsure_reassignment_as_a_proposal_not_as_applied(tmp_path: Path, tiny_bundle) -> None:
    from otcclip.models.report import review_rows

    man = read_manifest(make_manifest(tmp_path))
    d = sanitize(man, tiny_bundle, config=CFG).decisions
    r = next(i for i in range(len(man)) if d.action[i] == "keep")
    other = (r + 1) % len(man)
    d.review[r], d.review_reason[r] = True, "reassign/low_own_score: weak model"
    d.best_caption_index[r] = other
    row = {x["id"]: x for x in review_rows(man, d)}[man.ids[r]]
    assert row["new_caption"] is None  # kept: its caption did not change
    assert row["proposed_caption"] == man.captions[other]
    dropped = [i for i in range(len(man)) if d.action[i] == "drop"]
    moved = [i for i in range(len(man)) if d.action[i] == "reassign"]
    listed = {x["id"]: x for x in review_rows(man, d)}
    for i in dropped:
        assert listed[man.ids[i]]["new_caption"] is None and listed[man.ids[i]]["proposed_caption"] is None
    for i in moved:
        assert listed[man.ids[i]]["new_caption"] == man.captions[int(d.new_caption_index[i])]
