"""The settings dataclasses: one declaration per setting, nested overrides, validation,
the registry of detectors, and the API's and CLI's views generated from them."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import fields

import pytest

from otcclip.models.config import (
    DEFENCES,
    DETECTOR_SETTINGS,
    TRAINER_SANITIZE,
    DecisionSettings,
    OTSettings,
    SanitizeConfig,
    TrainConfig,
    from_dict,
    job_config,
    leaves,
    to_dict,
)


def test_nested_overrides_apply_on_top_of_the_field_default() -> None:
    c = from_dict(TrainConfig, {"defense": "otcclip", "sanitize": {"decisions": {"margin_z": 2.0}}})
    assert c.defence == "otcclip" and (c.warmup_epochs, c.rematch_every) == (1, 4)
    # the trainer's engine defaults stay; only margin_z changes
    assert c.sanitize.k == TRAINER_SANITIZE.k == 8
    assert c.sanitize.decisions.detectors == ("image_burst", "trigger_sensitivity")
    assert c.sanitize.decisions.trigger_sensitivity.knn == 100
    assert c.sanitize.decisions.margin_z == 2.0
    assert from_dict(TrainConfig, to_dict(c)) == c


@pytest.mark.parametrize("data, match", [
    ({"sanitize": {"bogus": 1}}, "unknown settings"),
    ({"lr": math.nan}, "finite"),
    ({"lr": math.inf}, "finite"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"device": "meta"}, "device"),
    ({"defence": "magic"}, "defence"),
    ({"defence": "none", "defense": "none"}, "alias"),
    ({"ot": {"iters": 0}}, "iters"),
    ({"sticky_reasons": ["nope"]}, "sticky_reasons"),
    ({"model": "../../etc/passwd"}, "model"),
    ({"model": "ViT-B-32-nonexistent"}, "model"),
])
def test_train_settings_refused(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_dict(TrainConfig, data)


@pytest.mark.parametrize("data, match", [
    ({"ot": {"iters": 0}}, "iters"),
    ({"index": {"nprobe": 0}}, "nprobe"),
    ({"shard_size": 1}, "shard_size"),
    ({"decisions": {"detectors": ["magic"]}}, "unknown detectors"),
    ({"alpha": 2}, "alpha"),
    ({"k": 0}, "k"),
])
def test_sanitize_settings_refused(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        job_config("sanitize", data)


def test_every_detector_is_registered_with_its_settings() -> None:
    from otcclip.models.detectors import REGISTRY

    assert list(REGISTRY) == list(DETECTOR_SETTINGS)
    for name, det in REGISTRY.items():
        assert det.settings is DETECTOR_SETTINGS[name]
        assert isinstance(DecisionSettings().detector(name), det.settings)


def test_every_defence_has_a_class() -> None:
    from otcclip.models.training.loop import DEFENCE_CLASSES

    assert tuple(DEFENCE_CLASSES) == DEFENCES


def test_every_setting_is_declared_with_help() -> None:
    for cls in (SanitizeConfig, TrainConfig, OTSettings):
        for path, f, _ in leaves(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{'.'.join(path)} has no help"


def test_validating_every_kind_does_not_load_torch() -> None:
    code = """
import json, sys, time
t0 = time.perf_counter()
from otcclip.service.schemas import validate_settings
out = {
    "sanitize": validate_settings("sanitize", {"checkpoint": "abc", "k": 4, "ot": {"iters": 30}, "decisions": {"margin_z": 2}}),
    "train": validate_settings("train", {"defence": "otcclip", "sanitize": {"k": 8}, "lr": 1e-3}),
    "evaluate": validate_settings("evaluate", {"checkpoint": "abc", "classes": ["a", "b"]}),
}
print(json.dumps({"torch": "torch" in sys.modules, "faiss": "faiss" in sys.modules, "out": out,
                  "seconds": time.perf_counter() - t0}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["faiss"] is False
    assert got["out"]["sanitize"] == {"checkpoint": "abc", "k": 4, "ot": {"iters": 30}, "decisions": {"margin_z": 2.0}}
    assert got["out"]["train"]["sanitize"] == {"k": 8}


def test_api_schema_refuses_what_the_core_refuses() -> None:
    from otcclip.service.schemas import SettingsError, validate_settings

    for kind, bad in [("train", {"lr": "NaN"}), ("train", {"sanitize": {"bogus": 1}}), ("sanitize", {"seed": 2**70}),
                      ("sanitize", {"device": "meta"}), ("sanitize", {"ot": {"iters": 0}}), ("evaluate", {}),
                      ("train", {"batch_size": 1}), ("sanitize", {"decisions": {"detectors": ["x"]}})]:
        with pytest.raises(SettingsError):
            validate_settings(kind, bad)
    assert validate_settings("train", {"defense": "roclip"}) == {"defence": "roclip"}


def test_cli_options_are_generated_from_the_settings() -> None:
    from otcclip.cli.options import add_settings, settings_from_args

    p = argparse.ArgumentParser()
    add_settings(p, TrainConfig)
    flags = {s for a in p._actions for s in a.option_strings}
    for path, _f, _ in leaves(TrainConfig):
        assert "--" + ".".join(x.replace("_", "-") for x in path) in flags
    args = p.parse_args(["--defense", "otcclip", "--sanitize.decisions.trigger-sensitivity.z", "2.5",
                         "--no-restart", "--ot.iters", "7", "--drop-reasons", "image_burst,density"])
    c = settings_from_args(args, TrainConfig)
    assert c.defence == "otcclip" and c.restart is False and c.ot.iters == 7
    assert c.sanitize.decisions.trigger_sensitivity.z == 2.5 and c.sanitize.k == 8
    assert c.drop_reasons == ("image_burst", "density")
    # nothing given: exactly the dataclass defaults
    assert settings_from_args(p.parse_args([]), TrainConfig) == TrainConfig()
    assert {f.name for f in fields(TrainConfig)} >= {"sanitize", "ot", "defence"}


@pytest.mark.parametrize("data, match", [
    ({}, "needs a model with weights"),
    ({"model": "ViT-B-32"}, "needs a model with weights"),
    ({"model": "ViT-B-32", "pretrained": "../weights.pt"}, "pretrained"),
    ({"checkpoint": "abc", "random_init": True}, "not both"),
    ({"model": "no-such-model", "pretrained": "openai"}, "model"),
])
def test_a_sanitize_job_needs_a_model_with_weights(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        job_config("sanitize", data)
    for ok in ({"checkpoint": "abc"}, {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
               {"model": "hf-hub:timm/some-clip"}, {"model": "otc-micro", "random_init": True}):
        job_config("sanitize", ok)


@pytest.mark.parametrize("obj, siblings", [
    ({"model": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "k": 4},
     {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "k": 4}),
    ({"model": {"name": "hf-hub:timm/some-clip"}}, {"model": "hf-hub:timm/some-clip"}),
    ({"model": {"name": "otc-micro"}, "random_init": True}, {"model": "otc-micro", "random_init": True}),
])
def test_a_model_object_gives_the_same_job_settings_as_the_sibling_keys(obj: dict, siblings: dict) -> None:
    from otcclip.service.schemas import validate_settings

    assert job_config("sanitize", obj) == job_config("sanitize", siblings)
    assert validate_settings("sanitize", obj) == validate_settings("sanitize", siblings) == siblings


@pytest.mark.parametrize("data, match", [
    ({"model": {"name": "no-such-model", "pretrained": "openai"}}, "model"),
    ({"model": {"name": "ViT-B-32"}}, "needs a model with weights"),
    ({"model": {"name": "ViT-B-32", "pretrained": "../weights.pt"}}, "pretrained"),
    ({"model": {"pretrained": "openai"}}, "needs a name"),
    ({"model": {"name": "ViT-B-32", "tag": "openai"}}, "unknown keys"),
    ({"model": {"name": "ViT-B-32", "pretrained": "openai"}, "pretrained": "openai"}, "both"),
])
def test_a_model_object_is_refused_like_the_sibling_keys(data: dict, match: str) -> None:
    from otcclip.service.schemas import SettingsError, validate_settings

    with pytest.raises(ValueError, match=match):
        job_config("sanitize", data)
    with pytest.raises(SettingsError, match=match):
        validate_settings("sanitize", data)
    with pytest.raises(ValueError, match="unknown settings"):  # other kinds have no model object
        job_config("evaluate", {"checkpoint": "abc", "model": {"name": "ViT-B-32"}})
