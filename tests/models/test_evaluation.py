"""Zero-shot, linear probe and ASRs on planted models whose answers are known."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from otcclip.models.attacks import TextTrigger, Trigger
from otcclip.models.evaluation import EvalConfig, evaluate
from otcclip.models.factory import ClipBundle, create_model

CLASSES = ("red", "green", "blue")
TOKEN = "cf"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class Planted(torch.nn.Module):
    """Text: one-hot of the colour word in the prompt. Image: one-hot of the dominant
    channel (solid colours), or of ``backdoor`` when the image is not uniform (a trigger).
    ``text_backdoor = (source, target)``: a prompt with the word ``TOKEN`` naming class
    ``source`` (any class when None) embeds as class ``target``."""

    def __init__(self, tokenizer, backdoor: int | None, swap: bool = False,  # type: ignore[no-untyped-def]
                 text_backdoor: tuple[int | None, int] | None = None) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.word_ids = [int(tokenizer([c])[0, 1]) for c in CLASSES]
        self.token_id = int(tokenizer([TOKEN])[0, 1])
        self.backdoor = backdoor
        self.swap = swap
        self.text_backdoor = text_backdoor

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.stack([(tokens == w).any(1).float() for w in self.word_ids], 1)
        if self.text_backdoor is not None:
            source, target = self.text_backdoor
            fire = (tokens == self.token_id).any(1)
            if source is not None:
                fire &= out[:, source] > 0
            out[fire] = torch.nn.functional.one_hot(torch.tensor(target), 3).float()
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
    noise = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Trigger("backdoor-sig", "blue", "sig", noise[:1, :1], alpha=20 / 255, frequency=6).save(d / "trigger-backdoor-sig.json")
    # a large ISSBA amplitude, so the planted model's "not uniform" test sees it
    Trigger("backdoor-issba", "green", "issba", noise, alpha=0.2, seed=3).save(d / "trigger-backdoor-issba.json")
    TextTrigger("text-trigger", "blue", TOKEN).save(d / "trigger-text-trigger.json")
    return {"test": d / "test.csv", "targets": d / "targets.csv", "trigger": d / "trigger-backdoor-patch.json",
            "sig": d / "trigger-backdoor-sig.json", "issba": d / "trigger-backdoor-issba.json", "text": d / "trigger-text-trigger.json"}


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


def test_sig_and_issba_asr_on_planted_models(data: dict[str, Path]) -> None:
    cfg = EvalConfig(trigger=[data["sig"], data["issba"]], classes=CLASSES, linear_probe=False)
    sig, issba = evaluate(_bundle(backdoor=None), data["test"], config=cfg).backdoor
    assert (sig["attack"], sig["asr"], sig["clean_rate"], sig["n"]) == ("backdoor-sig", 0.0, 0.0, 16)
    assert (issba["attack"], issba["asr"], issba["n"]) == ("backdoor-issba", 0.0, 16)
    # a model whose backdoor answers "blue" to any non-uniform image: SIG (target blue)
    # succeeds on every non-blue image; ISSBA's target is green, so it never does
    sig, issba = evaluate(_bundle(backdoor=2), data["test"], config=cfg).backdoor
    assert sig["asr"] == 1.0 and sig["clean_rate"] == 0.0
    assert issba["asr"] == 0.0 and issba["target_class"] == "green"
    sig, issba = evaluate(_bundle(backdoor=1), data["test"], config=cfg).backdoor
    assert sig["asr"] == 0.0 and issba["asr"] == 1.0


def test_text_trigger_asr_is_top1_retrieval_of_the_target(data: dict[str, Path]) -> None:
    cfg = EvalConfig(trigger=[data["text"]], classes=CLASSES, linear_probe=False)
    res = evaluate(_bundle(backdoor=None), data["test"], config=cfg)
    assert res.backdoor == []
    (tb,) = res.text_backdoor
    # queries: the 4 prompts of red and of green (not of the target, blue)
    assert (tb["attack"], tb["target_class"], tb["token"], tb["n"]) == ("text-trigger", "blue", TOKEN, 8)
    assert tb["asr"] == 0.0 and tb["clean_rate"] == 0.0
    (tb,) = evaluate(_bundle(backdoor=None, text_backdoor=(None, 2)), data["test"], config=cfg).text_backdoor
    assert tb["asr"] == 1.0 and tb["clean_rate"] == 0.0
    # the token only moves "red" prompts: half of the queries succeed
    (tb,) = evaluate(_bundle(backdoor=None, text_backdoor=(0, 2)), data["test"], config=cfg).text_backdoor
    assert tb["asr"] == 0.5
    # a backdoor towards another class than the trigger's target is no success
    (tb,) = evaluate(_bundle(backdoor=None, text_backdoor=(None, 0)), data["test"], config=cfg).text_backdoor
    assert tb["asr"] == 0.0
    # a model that retrieves blue for every prompt has a base rate of 1
    (tb,) = evaluate(_bundle(backdoor=None, swap=True), data["test"], config=EvalConfig(
        trigger=[data["text"]], classes=CLASSES, linear_probe=False, target_class="green")).text_backdoor
    assert tb["target_class"] == "green" and tb["clean_rate"] == 0.5  # swap: blue prompts retrieve the green images


def test_evaluate_cli_resolves_short_trigger_names(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from otcclip.cli import main
    from otcclip.cli.evaluate import SHORT_TRIGGERS

    assert SHORT_TRIGGERS["text"] == "text-trigger" and SHORT_TRIGGERS["sig"] == "backdoor-sig"
    rc = main(["evaluate", "--checkpoint", str(tmp_path), "--manifest", str(data["test"]), "--trigger", "text",
               "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "--poison-dir" in capsys.readouterr().err
    rc = main(["evaluate", "--checkpoint", str(tmp_path), "--manifest", str(data["test"]), "--trigger", "issba",
               "--poison-dir", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "trigger-backdoor-issba.json" in capsys.readouterr().err
