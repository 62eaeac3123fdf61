"""Zero-shot, linear probe and ASRs on planted models whose answers are known."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from otcclip.models.attacks import Trigger
from otcclip.models.evaluation import EvalConfig, evaluate
from otcclip.models.factory import ClipBundle, create_model

CLASSES = ("red", "green", "blue")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class Planted(torch.nn.Module):
    """Text: one-hot of the colour word in the prompt. Image: one-hot of the dominant
    channel (solid colours), or of ``backdoor`` when the image is not uniform (a trigger)."""

    def __init__(self, tokenizer, backdoor: int | None, swap: bool = False) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.word_ids = [int(tokenizer([c])[0, 1]) for c in CLASSES]
        self.backdoor = backdoor
        self.swap = swap

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.stack([(tokens == w).any(1).float() for w in self.word_ids], 1)
        return out + 1e-3

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        px = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        cls = px.mean((2, 3)).argmax(1)
        if self.swap:
            cls = (cls + 1) % 3
        if self.backdoor is not None:
            cls = torch.where(px.std((2, 3)).amax(1) > 0.05, torch.full_like(cls, self.backdoor), cls)
        return torch.nn.functional.one_hot(cls, 3).float() + 1e-3


def _bundle(**kw: object) -> ClipBundle:
    base = create_model("otc-micro", seed=0)
    model = Planted(base.tokenizer, **kw)  # type: ignore[arg-type]
    pp = {**base.preprocess_cfg, "mean": MEAN, "std": STD}
    return ClipBundle(model, "planted", base.model_cfg, pp, base.preprocess, base.preprocess_train, base.tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("colours")
    (d / "img").mkdir()
    colours = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}
    rows = []
    for c, rgb in colours.items():
        for k in range(8):
            rel = f"img/{c}{k}.png"
            Image.new("RGB", (16, 16), rgb).save(d / rel)
            rows.append({"id": f"{c}{k}", "image": rel, "label": c})
    with (d / "test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "label"])
        w.writeheader()
        w.writerows(rows)
    # targets: a green image whose adversarial class is blue, a red one -> green
    with (d / "targets.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "label", "target_class"])
        w.writeheader()
        w.writerow({"id": "t0", "image": "img/green0.png", "label": "green", "target_class": "blue"})
        w.writerow({"id": "t1", "image": "img/red0.png", "label": "red", "target_class": "green"})
    trig = Trigger("backdoor-patch", "blue", "patch", np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8), 0.25)
    trig.save(d / "trigger-backdoor-patch.json")
    return {"test": d / "test.csv", "targets": d / "targets.csv", "trigger": d / "trigger-backdoor-patch.json"}


def test_clean_planted_model(data: dict[str, Path]) -> None:
    cfg = EvalConfig(targets=data["targets"], trigger=data["trigger"], classes=CLASSES)
    res = evaluate(_bundle(backdoor=None), data["test"], config=cfg)
    assert res.n_test == 24
    assert res.zero_shot_top1 == 1.0
    assert res.linear_probe == 1.0
    assert res.targeted is not None and res.targeted["asr"] == 0.0
    assert [t["predicted"] for t in res.targeted["per_target"]] == ["green", "red"]
    (bd,) = res.backdoor
    assert bd["asr"] == 0.0 and bd["n"] == 16  # the 8 blue images are excluded


def test_backdoored_planted_model(data: dict[str, Path]) -> None:
    cfg = EvalConfig(trigger=[data["trigger"]], classes=CLASSES)
    res = evaluate(_bundle(backdoor=2), data["test"], config=cfg)
    assert res.zero_shot_top1 == 1.0  # clean images are unaffected
    (bd,) = res.backdoor
    assert bd["asr"] == 1.0 and bd["clean_rate"] == 0.0 and bd["target_class"] == "blue"


def test_targeted_success_and_wrong_model(data: dict[str, Path]) -> None:
    # a model shifted by one class: every target "green->blue", "red->green" succeeds
    res = evaluate(_bundle(backdoor=None, swap=True), data["test"], config=EvalConfig(targets=data["targets"], classes=CLASSES))
    assert res.zero_shot_top1 == 0.0
    assert res.targeted is not None and res.targeted["asr"] == 1.0
    assert res.to_dict()["targeted"]["n_targets"] == 2


def test_unknown_target_class_is_an_error(data: dict[str, Path]) -> None:
    from otcclip.models.training.data import DataError

    with pytest.raises(DataError, match="not among the classes"):
        evaluate(_bundle(backdoor=None), data["test"], config=EvalConfig(trigger=data["trigger"], classes=("red", "green")))
