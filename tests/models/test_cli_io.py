"""The command line's output: --version, quiet library logs, stage progress with units,
per-batch OT progress, ``sanitize --json``, and the demo's one line per stage change."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from otcclip import __version__
from otcclip.cli import configure_logging, main
from otcclip.cli._progress import StageBars
from otcclip.cli.demo import StageLog
from otcclip.models.checkpoint import save_checkpoint
from otcclip.models.config import OTSettings
from otcclip.models.manifest import read_manifest
from otcclip.models.sanitize import SanitizeConfig, sanitize
from tests.models.test_sanitize import make_manifest


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"otcclip {__version__}"


@pytest.mark.parametrize("command", ["train", "sanitize", "poison", "evaluate", "serve", "worker", "demo", "keys"])
def test_every_command_prints_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` lists every setting with its default; a literal '%' in a setting's help
    (argparse %-formats help strings) must not break it."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    if command == "train":
        assert "--dropped-share" in out and "% less per image" in out


def test_library_logs_quiet_unless_verbose() -> None:
    try:
        configure_logging(verbose=False)
        for name in ("alembic.runtime.migration", "faiss.loader", "kombu.connection"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert not logging.getLogger("kombu").isEnabledFor(logging.WARNING)
        assert logging.getLogger("otcclip.models.sanitize").isEnabledFor(logging.INFO)
        assert not logging.getLogger("open_clip_on_root").isEnabledFor(logging.INFO)
        configure_logging(verbose=True)
        assert logging.getLogger("faiss.loader").isEnabledFor(logging.DEBUG)
    finally:
        configure_logging(verbose=False)


def test_match_reports_per_batch(tmp_path: Path, tiny_bundle) -> None:
    m = read_manifest(make_manifest(tmp_path, n=24))
    events: list[tuple[str, int, int]] = []
    cfg = SanitizeConfig(k=4, batch_size=2, shard_size=12, device="cpu", ot=OTSettings(iters=10))
    sanitize(m, tiny_bundle, config=cfg, progress=lambda s, d, t: events.append((s, d, t)))
    match = [(d, t) for s, d, t in events if s == "match"]
    assert len(match) > 4  # per OT batch, not once per shard
    assert all(t == 24 for _, t in match) and match[-1][0] == 24
    assert [d for d, _ in match] == sorted(d for d, _ in match)
    stages = [s for s, _, _ in events]
    assert stages.index("match") > max(i for i, s in enumerate(stages) if s == "encode")


def test_stage_bars_units_and_lines(capsys: pytest.CaptureFixture[str]) -> None:
    bars = StageBars()
    bars("encode", 5, 10)
    assert bars.bar.unit == "pair" and bars.bar.n == 5
    bars("encode", 10, 10)
    bars("write", 1, 4)
    assert bars.bar.unit == "file"
    bars.close()
    err = capsys.readouterr().err
    assert "pair/s" in err or "s/pair" in err
    off = StageBars(disable=True)
    off("encode", 10, 10)
    off("decide", 10, 10)
    off.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["encode", "decide"] and "10 pair in" in lines[0]


def test_sanitize_json_summary(tmp_path: Path, tiny_bundle, capsys: pytest.CaptureFixture[str]) -> None:
    man = make_manifest(tmp_path / "data")
    ckpt = save_checkpoint(tiny_bundle, tmp_path / "ckpt", meta={})
    out = tmp_path / "out"
    rc = main(["sanitize", str(man), "--checkpoint", str(ckpt), "--out", str(out), "--k", "4", "--batch-size", "8",
               "--device", "cpu", "--no-progress", "--json"])
    assert rc == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert summary["pairs"] == 24 and sum(summary["actions"].values()) == 24
    assert Path(summary["outputs"]["manifest"]).is_file() and Path(summary["outputs"]["report_html"]).is_file()
    assert {"encode", "ot", "decide"} <= set(summary["timings_s"])
    assert "match: 24 pair in" in cap.err


def test_demo_prints_one_line_per_stage_change(capsys: pytest.CaptureFixture[str]) -> None:
    log = StageLog("sanitize")
    polls = [("queued", None, 0)] * 3 + [("running", "encode", d) for d in range(0, 100, 10)] \
        + [("running", "match", d) for d in range(0, 100, 5)] + [("succeeded", "match", 100)] * 2
    for state, stage, done in polls:
        log({"state": state, "stage": stage, "progress": {"done": done, "total": 100}})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1] == "  sanitize: running encode (100 to do)" and "succeeded" in lines[-1]


def test_train_reads_through_the_column_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.models.layouts import mapped_csv

    path = mapped_csv(tmp_path / "d", 4)
    out = ["--out", str(tmp_path / "run"), "--epochs", "1"]
    assert main(["train", str(path), *out]) == 2
    assert "missing required column(s) 'image', 'caption'" in capsys.readouterr().err
    assert main(["train", str(path), "--image-col", "filepath", "--caption-col", "nope", *out]) == 2
    assert "--caption-col 'nope': no such column" in capsys.readouterr().err
