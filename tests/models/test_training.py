"""Training loop: outputs, determinism, resume == uninterrupted, cancellation."""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch

from otcclip.models.checkpoint import load_checkpoint
from otcclip.models.progress import Cancelled
from otcclip.models.training import TrainConfig, train


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from otcclip.models.datasets import digits_manifest

    d = tmp_path_factory.mktemp("digits")
    full = digits_manifest(d, split="train")
    with full.open() as f:
        rows = list(csv.DictReader(f))[:192]
    out = d / "small.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def _cfg(**kw: object) -> TrainConfig:
    base = dict(model="otc-micro", epochs=3, batch_size=64, device="cpu", lr_warmup_steps=2, warmup_epochs=1, rematch_every=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(ckpt / "open_clip_model.safetensors"))


def test_train_writes_run_layout(small_manifest: Path, tmp_path: Path) -> None:
    seen: list[dict] = []
    calls: list[tuple[str, int, int]] = []
    res = train(small_manifest, tmp_path, config=_cfg(epochs=2), on_epoch=seen.append, progress=lambda s, d, t: calls.append((s, d, t)))
    assert res.epochs_done == 2
    assert (tmp_path / "checkpoints" / "epoch_001" / "train_state.pt").is_file()
    assert (tmp_path / "checkpoints" / "epoch_002" / "open_clip_config.json").is_file()
    bundle = load_checkpoint(res.final_checkpoint)
    assert bundle.extra["defence"] == "none"
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and [x["epoch"] for x in seen] == [1, 2]
    assert all(x["loss"] > 0 and x["time_s"] > 0 for x in lines)
    assert calls[-1] == ("train", 6, 6)  # 192 rows // 64 * 2 epochs
    # training actually changed the weights and the loss went down from log(64)
    assert lines[0]["clip"] < 1.2 * torch.log(torch.tensor(64.0)).item()


@pytest.mark.parametrize(
    ("defence", "cut", "restart_unchanged", "warmup"),
    # otcclip's first pass (after the warm-up) changes nothing on the clean digits: by
    # default it trains on from the warm-up model, with restart_unchanged it restarts;
    # cut inside the warm-up, at the pass and after it
    [("none", 2, False, 1), ("roclip", 2, False, 1), ("otcclip", 1, False, 1), ("otcclip", 2, False, 1),
     ("otcclip", 1, True, 1), ("otcclip", 3, True, 1), ("otcclip", 1, False, 2)],
)
def test_resume_equals_uninterrupted(
    small_manifest: Path, tmp_path: Path, defence: str, cut: int, restart_unchanged: bool, warmup: int
) -> None:
    cfg = _cfg(defence=defence, restart_unchanged=restart_unchanged, warmup_epochs=warmup)
    full = train(small_manifest, tmp_path / "full", config=cfg)

    stop = {"now": False}

    def on_epoch(rec: dict) -> None:
        if rec["epoch"] == cut:
            stop["now"] = True

    with pytest.raises(Cancelled):
        train(small_manifest, tmp_path / "cut", config=cfg, on_epoch=on_epoch, should_stop=lambda: stop["now"])
    assert not (tmp_path / "cut" / "final").exists()
    resumed = train(small_manifest, tmp_path / "cut", config=cfg, resume=True)
    a, b = _weights(full.final_checkpoint), _weights(resumed.final_checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x)["loss"] for x in full.metrics_path.read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in resumed.metrics_path.read_text().splitlines()]
    assert la == lb
    assert full.epochs_done == resumed.epochs_done == (3 + warmup if restart_unchanged else 3)
    if defence == "roclip":  # the caption memory bank travels with the checkpoint
        state = torch.load(tmp_path / "cut" / "checkpoints" / f"epoch_{cut:03d}" / "train_state.pt", weights_only=False)
        assert (state["defence"]["bank_ids"] >= 0).any()


def test_otcclip_restarts_from_the_initial_weights_after_its_first_pass(small_manifest: Path, tmp_path: Path) -> None:
    """The detection epochs are plain CLIP and come on top of ``epochs``; after the first
    pass the model, optimiser and schedule start again."""
    init = tmp_path / "init"
    train(small_manifest, init, config=_cfg(epochs=1, lr=1e-12, lr_warmup_steps=0))  # ~ the seed's initial weights
    res = train(small_manifest, tmp_path / "r", config=_cfg(defence="otcclip", epochs=2, checkpoint_every=1,
                                                            keep_checkpoints=0, restart_unchanged=True))
    assert res.epochs_done == 3
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert "inter" not in lines[0] and "inter" in lines[1]  # detection epoch: plain CLIP
    assert lines[1].get("restart") is True and "rematch" in lines[1] and "restart" not in lines[2]
    assert lines[1]["lr"] == pytest.approx(lines[0]["lr"])  # the schedule started again
    # the first restarted epoch starts from the initial weights: it ends no closer to the
    # detection epoch's weights than one epoch from the initial weights would
    w0, w1, w2 = (_weights(tmp_path / "r" / "checkpoints" / f"epoch_{e:03d}") for e in (1, 2, 3))
    wi = _weights(init / "final")
    k = "visual.proj"
    assert torch.dist(w1[k], wi[k]) == pytest.approx(torch.dist(w0[k], wi[k]), rel=0.5)
    assert torch.dist(w1[k], w0[k]) > 0.5 * torch.dist(w0[k], wi[k])
    kept = train(small_manifest, tmp_path / "k", config=_cfg(defence="otcclip", epochs=2, restart=False))
    assert kept.epochs_done == 2 and not any("restart" in json.loads(x) for x in kept.metrics_path.read_text().splitlines())
    assert w2.keys() == wi.keys()


def test_otcclip_trains_on_without_a_restart_when_its_first_pass_changes_nothing(
    small_manifest: Path, tmp_path: Path
) -> None:
    """On clean digits the first pass drops and re-matches no pair: the warm-up model
    trained on the very data the run goes on with, so it is kept and its epoch counts."""
    res = train(small_manifest, tmp_path / "r", config=_cfg(defence="otcclip", epochs=3, keep_checkpoints=0))
    assert res.epochs_done == 3
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert lines[1]["rematch_changed"] is False and lines[1]["restart"] is False
    assert "inter" not in lines[0] and "inter" in lines[1]  # the OTCCLIP step from the pass on
    assert lines[1]["lr"] < lines[0]["lr"]  # the schedule went on
    w0, w1 = (_weights(tmp_path / "r" / "checkpoints" / f"epoch_{e:03d}") for e in (1, 2))
    init = train(small_manifest, tmp_path / "init", config=_cfg(epochs=1, lr=1e-12, lr_warmup_steps=0))
    wi, k = _weights(init.final_checkpoint), "visual.proj"
    # went on from the warm-up weights: further from the initial ones than one epoch
    # takes, and closer to the warm-up's than one epoch from the initial ones lands (a
    # restart ends about one epoch's way from both, as in the test above)
    d0 = torch.dist(w0[k], wi[k])
    assert torch.dist(w1[k], wi[k]) > 1.2 * d0 and torch.dist(w1[k], w0[k]) < 0.9 * d0
    assert (tmp_path / "r" / "rematch" / "epoch_001" / "decisions.parquet").is_file()
    # epochs no more than the warm-up: one epoch after the pass (as many as a restart
    # would train), its record, checkpoint and progress complete
    calls: list[tuple[str, int, int]] = []
    one = train(small_manifest, tmp_path / "one", config=_cfg(defence="otcclip", epochs=1),
                progress=lambda s, d, t: calls.append((s, d, t)))
    assert one.epochs_done == 2 and (tmp_path / "one" / "rematch" / "epoch_001" / "decisions.parquet").is_file()
    rec = [json.loads(x) for x in one.metrics_path.read_text().splitlines()]
    assert len(rec) == 2 and rec[1]["restart"] is False and "rematch" in rec[1]
    assert calls[-1] == ("train", 6, 6)  # 192 rows // 64 * 2 epochs


def test_otcclip_puts_off_a_late_pass_and_runs_it_when_resumed_with_more_epochs(
    small_manifest: Path, tmp_path: Path
) -> None:
    """Passes at epochs 1, 3, 5 (K = 2, the interval fixed): with 4 epochs the one at 3
    would leave 1 epoch and is put off; resumed with 8 epochs the run passes at 4 and 6."""
    cfg = _cfg(defence="otcclip", epochs=4, rematch_every=2, rematch_backoff=1, keep_checkpoints=0)
    res = train(small_manifest, tmp_path / "r", config=cfg)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert lines[1]["restart"] is False and res.epochs_done == 4  # the first pass changed nothing
    assert [x["epoch"] for x in lines if "rematch" in x] == [2]
    more = train(small_manifest, tmp_path / "r", config=replace(cfg, epochs=8), resume=True)
    lines = [json.loads(x) for x in more.metrics_path.read_text().splitlines()]
    assert more.epochs_done == 8 and [x["epoch"] for x in lines] == list(range(1, 9))
    assert [x["epoch"] for x in lines if "rematch" in x] == [2, 5, 7]  # 0-based 1, 4, 6
    assert sorted(p.name for p in (tmp_path / "r" / "rematch").iterdir()) == ["epoch_001", "epoch_004", "epoch_006"]


def test_otcclip_quarantine_keeps_sticky_drops_out(small_manifest: Path, tmp_path: Path) -> None:
    """A pair dropped for a sticky reason stays dropped at every later re-match."""
    import pyarrow.parquet as pq

    cfg = _cfg(
        defence="otcclip", epochs=4, reassign="drop", drop_reasons=(), score_rematch=True,
        sticky_reasons=("low_own_score", "better_caption", "no_plausible_caption", "density"),
        # the engine's raw proposals (abstain off): a young model's are kept for review otherwise
        sanitize={"decisions": {"detectors": ("density",), "abstain": False}, "k": 8},
    )
    train(small_manifest, tmp_path, config=cfg)
    passes = [pq.read_table(tmp_path / "rematch" / f"epoch_{e:03d}" / "decisions.parquet").to_pydict() for e in (1, 2, 3)]
    dropped = [{i for i, a in zip(p["id"], p["action"], strict=True) if a == "drop"} for p in passes]
    assert dropped[0], "the first pass should drop something on this set"
    assert dropped[0] <= dropped[1] <= dropped[2]
    # what a later pass would have kept is marked, not silently re-admitted
    for p, prev in zip(passes[1:], dropped[:-1], strict=True):
        reason = dict(zip(p["id"], p["reason"], strict=True))
        assert all(reason[i] in cfg.sticky_reasons + ("quarantined",) for i in prev)


def test_otcclip_drops_no_clean_pair_without_the_decision_steps_evidence(tmp_path: Path) -> None:
    """On clean pairs (the demo's digits) the default otcclip passes drop nothing: a
    detector flag drops a pair only with the evidence the decision step asks of it (else
    the pair is kept for review); a young model's trigger-sensitivity false alarms used to
    drop and quarantine clean pairs (12 after these two passes)."""
    import pyarrow.parquet as pq

    from otcclip.models.datasets import digits_manifest

    man = digits_manifest(tmp_path / "digits", split="train")
    cfg = _cfg(defence="otcclip", epochs=6, batch_size=128, lr=1e-3, warmup_epochs=2, rematch_every=2,
               lr_warmup_steps=50, rematch_backoff=1)  # passes at 2 and 4: each steers 2 epochs
    res = train(man, tmp_path / "run", config=cfg)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert [x["rematch"]["drop"] for x in lines if "rematch" in x] == [0, 0]
    assert lines[2]["restart"] is False and len(lines) == 6  # nothing to forget: no restart
    assert all(x["n_active"] == 1347 for x in lines)
    flagged = 0
    for p in sorted((tmp_path / "run" / "rematch").iterdir()):
        t = pq.read_table(p / "decisions.parquet").to_pydict()
        assert set(t["action"]) == {"keep"}
        flagged += sum(bool(f) for f in t["detectors"])
    assert flagged, "no detector flag on this set: the test no longer exercises the rule"


def test_otcclip_passes_thin_out_while_they_change_nothing(small_manifest: Path, tmp_path: Path) -> None:
    """After a pass that changes no verdict the interval doubles (up to rematch_backoff x K);
    after one that changes any, it is K again. rematch_backoff=1 is the fixed schedule."""
    cfg = _cfg(defence="otcclip", epochs=9, rematch_every=1, rematch_backoff=4, checkpoint_every=4)
    res = train(small_manifest, tmp_path / "b", config=cfg)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    passes = [(x["epoch"] - 1, x["rematch_changed"], x["next_rematch"]) for x in lines if "rematch" in x]
    assert passes[0][0] == 1  # after the one warm-up epoch
    interval = 1
    for (e, changed, nxt), later in zip(passes, passes[1:] + [None], strict=True):
        interval = 1 if changed else min(2 * interval, 4)
        assert nxt == e + interval
        if later is not None:
            assert later[0] == nxt  # no pass in between, none skipped
        else:
            assert nxt > 8  # the run (9 epochs: 0..8) ended before it
    assert any(not c for _, c, _ in passes), "no unchanged pass: the backoff was not exercised"
    # which passes ran is on disk too
    assert sorted(int(p.name[6:]) for p in (tmp_path / "b" / "rematch").iterdir()) == [e for e, _, _ in passes]
    fixed = train(small_manifest, tmp_path / "f", config=replace(cfg, rematch_backoff=1, epochs=4))
    fixed_lines = [json.loads(x) for x in fixed.metrics_path.read_text().splitlines()]
    assert [x["epoch"] - 1 for x in fixed_lines if "rematch" in x] == [1, 2, 3]


def test_different_seed_differs(small_manifest: Path, tmp_path: Path) -> None:
    a = train(small_manifest, tmp_path / "a", config=_cfg(epochs=1, seed=0))
    b = train(small_manifest, tmp_path / "b", config=_cfg(epochs=1, seed=1))
    wa, wb = _weights(a.final_checkpoint), _weights(b.final_checkpoint)
    assert not torch.equal(wa["visual.proj"], wb["visual.proj"])


def test_only_final_and_the_last_epochs_are_kept_and_the_run_still_resumes(small_manifest: Path, tmp_path: Path) -> None:
    cfg = _cfg(epochs=4)  # keep_checkpoints: default 2
    full = train(small_manifest, tmp_path / "full", config=cfg)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["epoch_003", "epoch_004"]
    assert full.final_checkpoint.is_dir()
    stop = {"now": False}

    def on_epoch(rec: dict) -> None:
        stop["now"] = rec["epoch"] == 3

    with pytest.raises(Cancelled):
        train(small_manifest, tmp_path / "cut", config=cfg, on_epoch=on_epoch, should_stop=lambda: stop["now"])
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["epoch_002", "epoch_003"]
    resumed = train(small_manifest, tmp_path / "cut", config=cfg, resume=True)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["epoch_003", "epoch_004"]
    a, b = _weights(full.final_checkpoint), _weights(resumed.final_checkpoint)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    every = train(small_manifest, tmp_path / "all", config=_cfg(epochs=3, keep_checkpoints=0))
    assert every.epochs_done == 3 and len(list((tmp_path / "all" / "checkpoints").iterdir())) == 3


def _adam_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def _adam_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for s in steps:
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(s))
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


def test_the_trainers_adamw_is_fused_on_cpu_and_makes_the_plain_update() -> None:
    from otcclip.models.training.loop import _param_groups, adamw

    a, b = _adam_pair()
    fused = adamw(_param_groups(a, 0.1), lr=1e-2)
    assert all(g["fused"] for g in fused.param_groups)
    plain = torch.optim.AdamW(_param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    _adam_steps(a, fused, range(20))
    _adam_steps(b, plain, range(20))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert not torch.equal(pa, dict(_adam_pair()[0].named_parameters())[name])  # it trained
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_a_checkpointed_optimiser_resumes_with_the_implementation_it_was_written_with() -> None:
    from otcclip.models.training.loop import _param_groups, adamw

    # an optimiser state written before the trainer fused its AdamW
    a, b = _adam_pair()
    old = torch.optim.AdamW(_param_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    _adam_steps(a, old, range(5))
    b.load_state_dict(a.state_dict())
    resumed = adamw(_param_groups(b, 0.1), lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as torch.load gives it
    assert not any(g["fused"] for g in resumed.param_groups)
    _adam_steps(a, old, range(5, 10))
    _adam_steps(b, resumed, range(5, 10))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_rejects_changed_config(small_manifest: Path, tmp_path: Path) -> None:
    train(small_manifest, tmp_path, config=_cfg(epochs=1))
    with pytest.raises(ValueError, match="lr"):
        train(small_manifest, tmp_path, config=_cfg(epochs=2, lr=1e-3), resume=True)


def test_each_defence_gets_its_own_schedule_unless_set() -> None:
    assert (TrainConfig(defence="otcclip").warmup_epochs, TrainConfig(defence="otcclip").rematch_every) == (1, 4)
    for d in ("none", "safeclip"):
        c = TrainConfig(defence=d)
        assert (c.warmup_epochs, c.rematch_every) == (2, 2)
    # roclip: the official break_epoch 2 on 1-based epochs (its epochs 2, 4, ...)
    assert (TrainConfig(defence="roclip").warmup_epochs, TrainConfig(defence="roclip").rematch_every) == (1, 2)
    c = TrainConfig(defence="otcclip", warmup_epochs=3, rematch_every=2)
    assert (c.warmup_epochs, c.rematch_every) == (3, 2)
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=-2)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="defence"):
        TrainConfig(defence="magic")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="reassign"):
        TrainConfig(reassign="maybe")


@pytest.mark.slow
@pytest.mark.cifar
def test_end_to_end_cli_poison_train_evaluate(cifar_zip: Path, tmp_path: Path) -> None:
    """poison -> train (otcclip) -> evaluate through the CLI on a tiny CIFAR-10 slice."""
    import pyarrow.parquet as pq

    from otcclip.cli import main
    from otcclip.models.datasets import cifar10_manifest

    tr = cifar10_manifest(cifar_zip, tmp_path / "train", per_class=12, seed=0)
    te = cifar10_manifest(cifar_zip, tmp_path / "test", split="test", per_class=4, seed=0)
    pool = cifar10_manifest(cifar_zip, tmp_path / "pool", split="test", per_class=1, offset=4, seed=0)
    pdir = tmp_path / "poisoned"
    assert main([
        "poison", str(tr), "--attack", "targeted", "--target-class", "truck", "--attack", "backdoor-patch",
        "--target-class", "cat", "--n-poison", "8", "--targets-from", str(pool), "--out", str(pdir),
    ]) == 0
    truth = list(csv.DictReader((pdir / "poison_truth.csv").open()))
    assert sum(r["poisoned"] == "1" for r in truth) == 16
    run = tmp_path / "run"
    assert main([
        "train", str(pdir / "manifest.csv"), "--out", str(run), "--model", "otc-micro", "--defense", "otcclip",
        "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--warmup-epochs", "1", "--rematch-every", "1",
        "--rematch-backoff", "2", "--ot-negatives", "2", "--no-purified-rematch", "--no-fill-batches", "--lam-unlearn", "0.5", "--no-progress",
    ]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["ot_negatives"] == 2 and cfg["purified_rematch"] is False and cfg["template_search"] is True
    assert cfg["restart"] is True and cfg["fill_batches"] is False and cfg["lam_unlearn"] == 0.5
    assert cfg["rematch_backoff"] == 2
    dec = pq.read_table(run / "rematch" / "epoch_001" / "decisions.parquet").to_pydict()
    assert len(dec["id"]) == len(truth) and set(dec["action"]) <= {"keep", "reassign", "drop"}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and metrics[1]["restart"] is True  # 1 detection epoch + 3
    assert "rematch" in metrics[1] and "inter" in metrics[1] and "intra" in metrics[1]
    assert metrics[1]["next_rematch"] in (2, 3)  # K = 1 after a pass that changed verdicts, else 2
    out = tmp_path / "eval.json"
    assert main([
        "evaluate", "--checkpoint", str(run / "final"), "--manifest", str(te), "--trigger", "patch",
        "--poison-dir", str(pdir), "--out", str(out), "--device", "cpu",
    ]) == 0
    res = json.loads(out.read_text())
    assert 0.0 <= res["zero_shot_top1"] <= 1.0 and res["n_test"] == 40
    assert res["targeted"]["n_targets"] == 1 and res["backdoor"][0]["target_class"] == "cat"
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--manifest", str(te), "--out", str(out)]) == 2


def test_otcclip_pass_with_the_collapse_detector(small_manifest: Path, tmp_path: Path) -> None:
    """With ``collapse`` among the pass's detectors the pass computes content thumbnails
    and its flags reach the decisions (it may flag nothing on this data)."""
    import pyarrow.parquet as pq

    from otcclip.models.config.detectors import DecisionSettings
    from otcclip.models.config.sanitize import SanitizeConfig

    san = SanitizeConfig(k=8, decisions=DecisionSettings(abstain=False, detectors=("image_burst", "collapse")))
    res = train(small_manifest, tmp_path, config=_cfg(defence="otcclip", epochs=2, sanitize=san, restart=False,
                                                       drop_reasons=("image_burst", "collapse")))
    passes = sorted((tmp_path / "rematch").glob("epoch_*/decisions.parquet"))
    assert res.epochs_done == 2 and passes
    t = pq.read_table(passes[0]).to_pydict()
    assert len(t["action"]) == 192
    assert all(set(str(f).split(",")) <= {"", "image_burst", "collapse"} for f in t["detectors"])


def test_only_the_first_otcclip_pass_runs_the_trigger_sensitivity_detector(small_manifest: Path, tmp_path: Path) -> None:
    """later_purified off: the first pass scores every pair's trigger
    sensitivity on purified views, a later pass scores none (no views computed); on,
    both passes do (the default). pass_time_s reports each pass's sections."""
    cfg = _cfg(defence="otcclip", epochs=3, rematch_backoff=1)
    for later, run in ((False, "first"), (True, "every")):
        res = train(small_manifest, tmp_path / run, config=replace(cfg, later_purified=later))
        passes = sorted((tmp_path / run / "rematch").glob("epoch_*/decisions.parquet"))
        assert [p.parent.name for p in passes] == ["epoch_001", "epoch_002"]
        scored = [int(np.isfinite(np.asarray(pq.read_table(p).column("sensitivity_z").to_numpy(zero_copy_only=False), dtype=float)).sum())
                  for p in passes]
        assert scored[0] > 0
        assert (scored[1] > 0) == later
        laps = [json.loads(x)["pass_time_s"] for x in res.metrics_path.read_text().splitlines() if "rematch" in json.loads(x)]
        assert len(laps) == 2 and all({"encode", "purified", "decisions", "templates"} <= set(t) for t in laps)
