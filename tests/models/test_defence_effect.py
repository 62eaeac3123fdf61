"""The defence does what it is for: on a tiny poisoned run where plain CLIP learns both
attacks, ``--defence otcclip`` brings their success down, at no cost in accuracy.

The demo's data (scikit-learn's digits, ``otc-micro``) with a targeted attack (150 pairs,
one target image -> "three") and a patch backdoor (15 % of the pairs -> "zero"); both
models are trained with the same seed and schedule and evaluated on the held-out digits.
"""

from __future__ import annotations

from typing import Any

import pytest

from otcclip.models.attacks import PoisonConfig, poison_many
from otcclip.models.checkpoint import load_checkpoint
from otcclip.models.datasets import DIGIT_TEMPLATES, digits_manifest
from otcclip.models.evaluation import EvalConfig, evaluate
from otcclip.models.manifest import read_manifest
from otcclip.models.training import TrainConfig, train

EPOCHS = 10


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("effect")
    train_m = digits_manifest(work / "train", split="train", seed=0)
    test_m = digits_manifest(work / "test", split="test", seed=0)
    poisoned = poison_many(read_manifest(train_m), work / "poisoned", configs=[
        PoisonConfig("targeted", "three", n_poison=150, n_targets=1, target_pool=test_m, seed=0,
                     templates=DIGIT_TEMPLATES),
        PoisonConfig("backdoor-patch", "zero", rate=0.15, patch_frac=0.3, seed=0, templates=DIGIT_TEMPLATES),
    ])
    ev_cfg = EvalConfig(trigger=poisoned.manifest_path.parent / "trigger-backdoor-patch.json",
                        targets=poisoned.targets_path, templates=DIGIT_TEMPLATES, linear_probe=False, seed=0)
    out = {}
    for defence in ("none", "otcclip"):
        cfg = TrainConfig(model="otc-micro", epochs=EPOCHS, batch_size=64, lr=2e-3, seed=0, device="cpu",
                          defence=defence, warmup_epochs=2, rematch_every=2)
        run = train(poisoned.manifest_path, work / defence, config=cfg)
        out[defence] = evaluate(load_checkpoint(run.final_checkpoint, device="cpu"), test_m, config=ev_cfg).to_dict()
    return out


def test_plain_clip_learns_both_attacks(results: dict[str, dict[str, Any]]) -> None:
    """The precondition: without it the next test would compare two clean models."""
    none = results["none"]
    assert none["targeted"]["asr"] >= 0.9
    assert none["backdoor"][0]["asr"] >= 0.4


def test_otcclip_lowers_attack_success_against_none_without_costing_accuracy(
    results: dict[str, dict[str, Any]],
) -> None:
    none, ours = results["none"], results["otcclip"]
    assert ours["targeted"]["asr"] <= 0.1 < none["targeted"]["asr"] - 0.5
    bd_none, bd_ours = none["backdoor"][0], ours["backdoor"][0]
    assert bd_ours["asr"] <= bd_none["asr"] - 0.3
    # about the clean base rate: untriggered test images already predicted as the target
    assert bd_ours["asr"] <= bd_ours["clean_rate"] + 0.1
    assert ours["zero_shot_top1"] >= none["zero_shot_top1"] - 0.05
