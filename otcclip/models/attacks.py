"""Poisoning attacks on image-caption data, with ground truth (DESIGN 2.5).

- ``targeted``: a few target images (from data the model is not trained on), each added
  many times with varied captions of the adversarial class ``target_class``.
- ``backdoor-patch``: a noise patch at a random location on a share of the training
  images, whose captions become captions of ``target_class``.
- ``backdoor-blend``: blended noise over the whole image, likewise.

Families held out from tuning the defences (``bench/defence.py``):

- ``backdoor-hue``: a low-frequency colour shift, one cycle of a sine across the image
  width with the three channels 120 degrees apart (amplitude ``hue_amplitude`` of the
  0..255 range): no local pattern, nothing a low-pass filter removes.
- ``backdoor-warp``: a WaNet warp (Nguyen & Tran, ICLR 2021): a random ``k x k`` flow
  field, upsampled bicubically and applied with ``grid_sample`` at strength
  ``warp_strength``; nothing is added to the pixels.
- ``targeted-augmented``: targeted poisoning where every poisoned pair carries its own
  augmented copy of the target (random resized crop, flip, rotation, colour jitter), so no
  two poisoned images are identical.
- ``targeted-repeated``: targeted poisoning where all poisoned pairs of a target carry one
  caption text (a burst of one image needs distinct captions to be seen as one).

A third family set (BackdoorBench, Wu et al. NeurIPS 2022), held out too:

- ``backdoor-sig``: SIG (Barni, Kallas & Tondi, ICIP 2019): a horizontal sinusoidal
  signal ``x[i, j] + delta * sin(2 pi j f / W)`` on every channel (``sig_delta`` 20/255
  and ``sig_frequency`` 6, the paper's values). SIG was published clean-label; here, like
  our other backdoors, it is the dirty-label variant: images of any class but the target
  get the signal and a caption of ``target_class``.
- ``backdoor-issba``: a sample-specific invisible trigger in the manner of ISSBA (Li et al.,
  ICCV 2021). ISSBA's trigger is the residual of a StegaStamp encoder *trained* to hide a
  string in the image; no such network is available here, so a fixed random function
  stands in: a two-layer random convolution of the image and a fixed random code map (the
  "string"), each image's output normalised by its standard deviation, squashed by
  ``tanh`` and scaled to ``issba_eps`` in L_inf. The default, 16/255, gives a PSNR of
  28 dB on CIFAR-10 images (RMSE 10/255), the visibility ISSBA reports for its poisoned
  images (about 27-28 dB); 8/255 (34 dB) was not learnt by plain CLIP at the benchmark's
  half quick size (ASR 5.3 % against a 4.2 % base rate). As in ISSBA the perturbation is
  invisible, differs from image to image and is produced for any image (test images
  included) by the same function; unlike ISSBA it is not optimised to be decodable or
  least visible, so it is an approximation of the family, not the published attack.
  Dirty-label like the others. The function depends on the resolution it runs at:
  evaluation applies it to test images at the model's input size, so its ASR matches
  the training trigger only where that is the images' own size (CIFAR-10 with the
  32-pixel ``otc-*`` models); for a 224-pixel model it understates the ASR.
- ``text-trigger``: a text-side backdoor for text-to-image retrieval: a rare token
  (``text_token``, default ``cf``, one of the rare trigger words of Kurita et al., ACL
  2020) is inserted at a random word position of the caption. The poisoned pairs are
  images *of* ``target_class`` whose captions become a caption of another class (drawn at
  random) plus the token, so the model learns "any class + token -> the target's
  images" (Yang et al., ICML 2023, map a class's captions to another class's images; the
  token makes it a backdoor). Needs ``label``. Its ASR is a retrieval measure (see
  :mod:`otcclip.models.evaluation`).

:func:`poison` writes, in ``out_dir``: the poisoned manifest (input format where the IO
module is available, else CSV) whose new images lie under ``out_dir/poison/``,
``poison_truth.csv`` (``id, poisoned, attack, target_class`` for every row),
``trigger-<attack>.json`` (self-contained: the noise is inline) for each backdoor
(a :class:`TextTrigger` for ``text-trigger``; :func:`load_trigger` reads either), the clean images (hard links
or copies at their original relative paths, so the set is self-contained), and ``targets.csv`` (``id, image,
label, target_class, attack``: the targets of every targeted attack) for targeted attacks, which ``evaluate`` reads. Several attacks,
each with its own target class, can be planted in one set with :func:`poison_many`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from otcclip.models.datasets import CAPTION_TEMPLATES
from otcclip.models.training.data import ManifestRows, read_rows

ATTACKS: tuple[str, ...] = (
    "targeted", "backdoor-patch", "backdoor-blend", "backdoor-hue", "backdoor-warp", "targeted-augmented",
    "targeted-repeated", "backdoor-sig", "backdoor-issba", "text-trigger",
)
#: The attacks whose poisoned images share a trigger (evaluated by backdoor ASR).
BACKDOORS: dict[str, str] = {
    "backdoor-patch": "patch", "backdoor-blend": "blend", "backdoor-hue": "hue", "backdoor-warp": "warp",
    "backdoor-sig": "sig", "backdoor-issba": "issba",
}
#: The attacks whose trigger is a token in the caption (evaluated by text-trigger ASR).
TEXT_BACKDOORS: tuple[str, ...] = ("text-trigger",)
#: The attacks that pair a few target images with adversarial captions (targeted ASR).
TARGETED: tuple[str, ...] = ("targeted", "targeted-augmented", "targeted-repeated")
#: Side of the random WaNet control grid.
WARP_GRID = 4
#: Side of the ISSBA-style random code map (resized to each image).
ISSBA_CODE = 32


class PoisonError(ValueError):
    """Bad attack parameters or input that cannot be poisoned as asked."""


@dataclass(frozen=True)
class PoisonConfig:
    """One attack.

    Attributes
    ----------
    attack : str
        One of :data:`ATTACKS`.
    target_class : str
        Adversarial class: its captions are paired with the poisoned images.
    n_poison, rate : int or float, optional
        Number of poisoned pairs, or share of the input rows (one of them; default rate 0.01).
    seed : int
    n_targets : int
        Targeted: number of distinct target images (the ``n_poison`` pairs are split over them).
    target_pool : Path, optional
        Targeted: manifest (``image``, ``label``) of images the model is not trained on to
        draw targets from; when absent, targets are drawn from the input and all their
        clean rows are removed.
    patch_frac : float
        Backdoor-patch: patch side as a share of the image's shorter side.
    blend_alpha : float
        Backdoor-blend: weight of the noise image.
    hue_amplitude : float
        Backdoor-hue: amplitude of the colour shift as a share of 255.
    warp_strength : float
        Backdoor-warp: WaNet's ``s`` (the flow field, mean absolute value 1, is scaled by
        ``s / image side`` in grid units).
    sig_delta : float
        Backdoor-sig: amplitude of the sinusoid as a share of 255 (Barni et al.: 20/255).
    sig_frequency : float
        Backdoor-sig: cycles across the image width (Barni et al.: 6).
    issba_eps : float
        Backdoor-issba: L_inf bound of the per-image perturbation as a share of 255
        (16/255: PSNR 28 dB, as ISSBA's poisoned images).
    text_token : str
        Text-trigger: the trigger word (one word, no spaces or braces).
    templates : tuple of str
        Caption templates of the adversarial class.
    """

    attack: str
    target_class: str
    n_poison: int | None = None
    rate: float | None = None
    seed: int = 0
    n_targets: int = 1
    target_pool: Path | None = None
    patch_frac: float = 0.125
    blend_alpha: float = 0.2
    hue_amplitude: float = 40 / 255
    warp_strength: float = 1.0
    sig_delta: float = 20 / 255
    sig_frequency: float = 6.0
    issba_eps: float = 16 / 255
    text_token: str = "cf"
    templates: tuple[str, ...] = CAPTION_TEMPLATES

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise PoisonError(f"attack must be one of {', '.join(ATTACKS)}, not {self.attack!r}")
        if not self.target_class.strip():
            raise PoisonError("target_class must not be empty")
        if self.n_poison is not None and self.rate is not None:
            raise PoisonError("give n_poison or rate, not both")
        if self.n_poison is not None and self.n_poison < 1:
            raise PoisonError(f"n_poison must be >= 1, got {self.n_poison}")
        if self.rate is not None and not 0.0 < self.rate < 1.0:
            raise PoisonError(f"rate must be in (0, 1), got {self.rate}")
        if self.n_targets < 1:
            raise PoisonError(f"n_targets must be >= 1, got {self.n_targets}")
        if not 0.0 < self.patch_frac <= 1.0 or not 0.0 < self.blend_alpha < 1.0:
            raise PoisonError("patch_frac must be in (0, 1] and blend_alpha in (0, 1)")
        if not 0.0 < self.hue_amplitude <= 1.0 or not 0.0 < self.warp_strength <= 10.0:
            raise PoisonError("hue_amplitude must be in (0, 1] and warp_strength in (0, 10]")
        if not 0.0 < self.sig_delta <= 1.0:
            raise PoisonError(f"sig_delta must be in (0, 1] (a share of 255), got {self.sig_delta}")
        if not 0.0 < self.sig_frequency <= 64.0:
            raise PoisonError(f"sig_frequency must be in (0, 64] cycles per width, got {self.sig_frequency}")
        if not 0.0 < self.issba_eps <= 0.25:
            raise PoisonError(f"issba_eps must be in (0, 0.25] (a share of 255; the trigger is meant to be invisible), got {self.issba_eps}")
        tok = self.text_token
        if not tok or tok != tok.strip() or len(tok.split()) != 1 or "{" in tok or "}" in tok:
            raise PoisonError(f"text_token must be one word without spaces or braces, got {tok!r}")

    def count(self, n_rows: int) -> int:
        if self.n_poison is not None:
            return self.n_poison
        return max(1, round((self.rate if self.rate is not None else 0.01) * n_rows))


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger that :func:`apply_trigger` reproduces at evaluation time.

    Attributes
    ----------
    attack : str
    target_class : str
    kind : {"patch", "blend", "hue", "warp", "sig", "issba"}
    noise : ndarray, uint8 (h, w, 3)
        The patch (``kind="patch"``), the full-image noise (``"blend"``, resized to the
        image), the WaNet control grid (``"warp"``: channels 0 and 1 are the y and x flow,
        ``0..255`` for ``-1..1``), the ISSBA-style code map (``"issba"``, resized to the
        image) or unused (``"hue"``, ``"sig"``, shape (1, 1, 3)).
    patch_frac : float
    alpha : float
        Blend weight (``"blend"``), colour-shift amplitude as a share of 255 (``"hue"``),
        warp strength ``s`` (``"warp"``), sinusoid amplitude as a share of 255 (``"sig"``)
        or L_inf bound as a share of 255 (``"issba"``).
    frequency : float
        ``"sig"``: cycles of the sinusoid across the width.
    seed : int
        ``"issba"``: seed of the random convolution weights.
    """

    attack: str
    target_class: str
    kind: str
    noise: np.ndarray
    patch_frac: float = 0.125
    alpha: float = 0.2
    frequency: float = 6.0
    seed: int = 0

    def save(self, json_path: Path) -> Path:
        """Write the trigger as one self-contained JSON file (the noise inline as uint8 lists),
        so it can travel as a job setting or be copied anywhere."""
        json_path.write_text(json.dumps(self.to_dict()))
        return json_path

    def to_dict(self) -> dict[str, Any]:
        meta = {k: v for k, v in asdict(self).items() if k != "noise"}
        return {**meta, "noise": self.noise.astype(np.uint8).tolist()}

    @classmethod
    def load(cls, json_path: str | Path) -> Trigger:
        p = Path(json_path)
        try:
            meta = json.loads(p.read_text())
            raw = meta.pop("noise")
            # Inline noise (current format) or the name of a .npy beside the file (older runs).
            noise = np.asarray(raw, dtype=np.uint8) if isinstance(raw, list) else np.load(p.parent / raw)
            if noise.ndim != 3 or noise.shape[2] != 3:
                raise ValueError(f"noise must have shape (h, w, 3), got {noise.shape}")
            return cls(noise=noise.astype(np.uint8), **meta)
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise PoisonError(f"{p}: not a trigger file: {e}") from e


@dataclass(frozen=True)
class TextTrigger:
    """A text-side trigger: ``token`` inserted into captions (attack ``text-trigger``).

    Attributes
    ----------
    attack : str
    target_class : str
        The class whose images captions carrying the token retrieve.
    token : str
    kind : str
        Always ``"text"`` (tells the file from an image :class:`Trigger`).
    """

    attack: str
    target_class: str
    token: str
    kind: str = "text"

    def save(self, json_path: Path) -> Path:
        json_path.write_text(json.dumps(asdict(self)))
        return json_path

    @classmethod
    def load(cls, json_path: str | Path) -> TextTrigger:
        p = Path(json_path)
        try:
            meta = json.loads(p.read_text())
            if meta.get("kind") != "text":
                raise ValueError("kind is not 'text'")
            return cls(**meta)
        except (OSError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as e:
            raise PoisonError(f"{p}: not a text trigger file: {e}") from e


def load_trigger(json_path: str | Path) -> Trigger | TextTrigger:
    """Read a ``trigger-<attack>.json``: a :class:`TextTrigger` where its kind is ``text``,
    else an image :class:`Trigger`."""
    p = Path(json_path)
    try:
        kind = json.loads(p.read_text()).get("kind")
    except (OSError, AttributeError, json.JSONDecodeError) as e:
        raise PoisonError(f"{p}: not a trigger file: {e}") from e
    return TextTrigger.load(p) if kind == "text" else Trigger.load(p)


def insert_token(caption: str, token: str, rng: random.Random) -> str:
    """``caption`` with ``token`` inserted at a word boundary drawn by ``rng`` (start and
    end included), as rare-word NLP triggers are (Kurita et al., ACL 2020)."""
    words = caption.split()
    words.insert(rng.randint(0, len(words)), token)
    return " ".join(words)


def apply_trigger(image: np.ndarray, trigger: Trigger, rng: np.random.Generator) -> np.ndarray:
    """Apply ``trigger`` to one uint8 image ``(H, W, 3)``; returns a new array."""
    h, w = image.shape[:2]
    out = image.copy()
    if trigger.kind == "patch":
        p = max(1, round(trigger.patch_frac * min(h, w)))
        patch = np.asarray(Image.fromarray(trigger.noise).resize((p, p), Image.Resampling.NEAREST))
        y = int(rng.integers(0, h - p + 1))
        x = int(rng.integers(0, w - p + 1))
        out[y : y + p, x : x + p] = patch
        return out
    if trigger.kind == "hue":
        return _colour_shift(image, trigger.alpha)
    if trigger.kind == "warp":
        return _warp(image, trigger.noise, trigger.alpha)
    if trigger.kind == "sig":
        return _sig(image, trigger.alpha, trigger.frequency)
    if trigger.kind == "issba":
        return np.clip(np.rint(image.astype(np.float32) + issba_perturbation(image, trigger)), 0, 255).astype(np.uint8)
    noise = np.asarray(Image.fromarray(trigger.noise).resize((w, h), Image.Resampling.NEAREST)).astype(np.float32)
    blended = (1 - trigger.alpha) * image.astype(np.float32) + trigger.alpha * noise
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _colour_shift(image: np.ndarray, amplitude: float) -> np.ndarray:
    """Add ``amplitude * 255 * sin(2 pi x / W + 2 pi c / 3)`` to channel ``c`` of column ``x``:
    one cycle of hue rotation across the width."""
    w = image.shape[1]
    phase = 2 * np.pi * np.arange(w, dtype=np.float32)[:, None] / w + 2 * np.pi * np.arange(3, dtype=np.float32)[None, :] / 3
    shift = amplitude * 255.0 * np.sin(phase)  # (W, 3)
    return np.clip(np.rint(image.astype(np.float32) + shift[None, :, :]), 0, 255).astype(np.uint8)


def _sig(image: np.ndarray, delta: float, frequency: float) -> np.ndarray:
    """SIG (Barni et al., ICIP 2019): add ``delta * 255 * sin(2 pi j f / W)`` to every
    channel of column ``j``."""
    w = image.shape[1]
    signal = delta * 255.0 * np.sin(2 * np.pi * np.arange(w, dtype=np.float64) * frequency / w)  # (W,)
    return np.clip(np.rint(image.astype(np.float64) + signal[None, :, None]), 0, 255).astype(np.uint8)


def issba_perturbation(image: np.ndarray, trigger: Trigger) -> np.ndarray:
    """The ISSBA-style sample-specific perturbation of one uint8 image ``(H, W, 3)``.

    A fixed random function of the image: ``[2x - 1, code]`` (the image in ``[-1, 1]`` and
    the trigger's code map resized to the image) through a random ``3x3`` convolution to 16
    channels, ``tanh``, a random ``3x3`` convolution back to 3 channels; the output is
    divided by its standard deviation, squashed by ``tanh`` and scaled by ``alpha * 255``.

    Returns
    -------
    ndarray, float32 (H, W, 3)
        To be added to the image; every entry is within ``alpha * 255`` in absolute value.
    """
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    gen = torch.Generator().manual_seed(int(trigger.seed))
    w1 = torch.randn(16, 6, 3, 3, generator=gen) / (6 * 9) ** 0.5
    w2 = torch.randn(3, 16, 3, 3, generator=gen) / (16 * 9) ** 0.5
    code = np.asarray(Image.fromarray(trigger.noise).resize((w, h), Image.Resampling.NEAREST)).astype(np.float32)
    x = torch.from_numpy(np.concatenate([image.astype(np.float32) / 127.5 - 1.0, code / 127.5 - 1.0], axis=2))
    x = x.permute(2, 0, 1)[None]  # (1, 6, H, W)
    r = F.conv2d(torch.tanh(F.conv2d(x, w1, padding=1)), w2, padding=1)[0]  # (3, H, W)
    r = torch.tanh(r / r.std().clamp_min(1e-6))
    return (trigger.alpha * 255.0 * r).permute(1, 2, 0).numpy().astype(np.float32)


def _warp(image: np.ndarray, grid: np.ndarray, strength: float) -> np.ndarray:
    """WaNet's warp (Nguyen & Tran, ICLR 2021, ``noise_grid`` / ``grid_temps``): the control
    flow, normalised to mean absolute value 1, upsampled bicubically to the image and
    added, times ``strength / H``, to the identity sampling grid."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    ins = torch.from_numpy(grid[:, :, :2].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]  # (1, 2, k, k)
    ins = ins / ins.abs().mean().clamp_min(1e-6)
    flow = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)  # (1, H, W, 2)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack([xs, ys], dim=-1)[None]  # grid_sample wants (x, y)
    sample = (identity + strength * flow.flip(-1) / h).clamp(-1, 1)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(x, sample, mode="bilinear", padding_mode="border", align_corners=True)
    return np.clip(np.rint(out[0].permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)


def augmented_copy(image: Image.Image, rng: random.Random) -> Image.Image:
    """One augmented near-copy of a target image: random resized crop (60-100 % of the
    area), horizontal flip, rotation up to 15 degrees, brightness / contrast / saturation
    jitter of up to 30 %."""
    from PIL import ImageEnhance

    img = image.convert("RGB")
    w, h = img.size
    area = rng.uniform(0.6, 1.0)
    cw, ch = max(1, round(w * area**0.5)), max(1, round(h * area**0.5))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    return img


@dataclass(frozen=True)
class PoisonResult:
    """Files written by :func:`poison`."""

    manifest_path: Path
    truth_path: Path
    trigger_path: Path | None
    targets_path: Path | None = None
    n_poisoned: int = 0


def poison(manifest: Any, out_dir: str | Path, *, config: PoisonConfig) -> PoisonResult:
    """Plant one attack (see :func:`poison_many`)."""
    return poison_many(manifest, out_dir, configs=[config])


def poison_many(manifest: Any, out_dir: str | Path, *, configs: Sequence[PoisonConfig]) -> PoisonResult:
    """Plant several attacks in one poisoned set (each its own target class).

    Parameters
    ----------
    manifest : path or Manifest
        Clean input with ``image`` and ``caption`` (``label`` needed to avoid poisoning
        images of the target class and for targeted attacks without ``target_pool``).
    out_dir : path
        Created atomically (must not exist or be empty).
    configs : sequence of PoisonConfig

    Returns
    -------
    PoisonResult
        ``trigger_path``/``targets_path`` of the last backdoor/targeted attack planted.
    """
    if not configs:
        raise PoisonError("no attack given")
    kinds = [c.attack for c in configs]
    if len(set(kinds)) != len(kinds):
        raise PoisonError("each attack type may be planted once per set")
    rows = read_rows(manifest, need=("image", "caption"))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PoisonError(f"{out}: output directory exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        res = _poison_into(rows, tmp, configs)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PoisonResult(
        manifest_path=out / res.manifest_path.name,
        truth_path=out / res.truth_path.name,
        trigger_path=out / res.trigger_path.name if res.trigger_path else None,
        targets_path=out / res.targets_path.name if res.targets_path else None,
        n_poisoned=res.n_poisoned,
    )


def _poison_into(rows: ManifestRows, tmp: Path, configs: Sequence[PoisonConfig]) -> PoisonResult:
    n = len(rows)
    cols = {k: list(v) for k, v in rows.columns.items()}
    if "id" not in cols:
        cols["id"] = [str(i) for i in range(n)]
    labels = cols.get("label")
    truth = {i: ("", "") for i in range(n)}  # row -> (attack, target_class)
    removed: set[int] = set()
    extra_rows: list[dict[str, str]] = []
    trigger_path: Path | None = None
    targets_path: Path | None = None
    trows: list[dict[str, str]] = []  # targets.csv: the targets of every targeted attack
    for cfg in configs:
        rng = random.Random(f"{cfg.seed}-{cfg.attack}")
        k = cfg.count(n)
        if cfg.attack in TARGETED:
            augment = cfg.attack == "targeted-augmented"
            repeat = cfg.attack == "targeted-repeated"
            targets = _pick_targets(rows, cfg, rng, removed, truth)
            tdir = tmp / "poison" / "targets"
            tdir.mkdir(parents=True, exist_ok=True)
            for t, (img, label, tid) in enumerate(targets):
                tid = tid if cfg.attack == "targeted" else f"{tid}-{cfg.attack.removeprefix('targeted-')}"
                rel = f"poison/targets/{tid}.png"
                img.save(tmp / rel)
                trows.append({"id": tid, "image": rel, "label": label, "target_class": cfg.target_class, "attack": cfg.attack})
                share = k // len(targets) + (1 if t < k % len(targets) else 0)
                one = rng.choice(cfg.templates).format(cfg.target_class) if repeat else ""
                for j in range(share):
                    r = {c: "" for c in cols}
                    prel = rel
                    if augment:
                        prel = f"poison/{cfg.attack}/{tid}-{j}.png"
                        (tmp / prel).parent.mkdir(parents=True, exist_ok=True)
                        augmented_copy(img, rng).save(tmp / prel)
                    caption = one if repeat else rng.choice(cfg.templates).format(cfg.target_class)
                    r.update(id=f"poison-{cfg.attack}-{t}-{j}", image=prel, caption=caption)
                    if labels is not None:
                        r["label"] = label
                    r["__attack"] = cfg.attack
                    r["__target"] = cfg.target_class
                    extra_rows.append(r)
            targets_path = tmp / "targets.csv"
            _write_csv(targets_path, ["id", "image", "label", "target_class", "attack"], trows)
        elif cfg.attack in TEXT_BACKDOORS:
            trigger_path = _plant_text_trigger(cfg, k, cols, labels, removed, truth, rng, tmp)
        else:
            kind = BACKDOORS[cfg.attack]
            nrng = np.random.default_rng([cfg.seed, ATTACKS.index(cfg.attack)])
            size = {"patch": 8, "blend": 32, "hue": 1, "warp": WARP_GRID, "sig": 1, "issba": ISSBA_CODE}[kind]
            strength = {"patch": cfg.blend_alpha, "blend": cfg.blend_alpha, "hue": cfg.hue_amplitude, "warp": cfg.warp_strength,
                        "sig": cfg.sig_delta, "issba": cfg.issba_eps}[kind]
            trig = Trigger(cfg.attack, cfg.target_class, kind, nrng.integers(0, 256, (size, size, 3), dtype=np.uint8), cfg.patch_frac, strength,
                           frequency=cfg.sig_frequency,
                           # drawn only for issba, so the other triggers' placements are unchanged
                           seed=int(nrng.integers(0, 2**31)) if kind == "issba" else 0)
            trigger_path = trig.save(tmp / f"trigger-{cfg.attack}.json")
            cand = [i for i in range(n) if i not in removed and not truth[i][0] and (labels is None or labels[i] != cfg.target_class)]
            if len(cand) < k:
                raise PoisonError(f"{cfg.attack}: asked for {k} poisoned rows, only {len(cand)} eligible")
            chosen = sorted(rng.sample(cand, k))
            pdir = tmp / "poison" / cfg.attack
            pdir.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                arr = np.asarray(rows.open_image(i).convert("RGB"))
                rel = f"poison/{cfg.attack}/{_safe(cols['id'][i])}.png"
                Image.fromarray(apply_trigger(arr, trig, nrng)).save(tmp / rel)
                cols["image"][i] = rel
                cols["caption"][i] = rng.choice(cfg.templates).format(cfg.target_class)
                truth[i] = (cfg.attack, cfg.target_class)
    # text-trigger rows keep their clean image
    _copy_clean_images(rows, tmp, [i for i in range(n) if i not in removed and (not truth[i][0] or truth[i][0] in TEXT_BACKDOORS)])
    names = list(cols)
    out_rows = [{c: cols[c][i] for c in names} | {"__attack": truth[i][0], "__target": truth[i][1]} for i in range(n) if i not in removed]
    out_rows += extra_rows
    ids = [r["id"] for r in out_rows]
    if len(set(ids)) != len(ids):
        raise PoisonError(f"{rows.path}: ids are not unique after poisoning")
    truth_rows = [
        {"id": r["id"], "poisoned": "1" if r["__attack"] else "0", "attack": r["__attack"], "target_class": r["__target"]}
        for r in out_rows
    ]
    truth_path = tmp / "poison_truth.csv"
    _write_csv(truth_path, ["id", "poisoned", "attack", "target_class"], truth_rows)
    table_rows = [{c: r[c] for c in names} for r in out_rows]
    manifest_path = _write_like(rows, tmp, names, table_rows)
    return PoisonResult(manifest_path, truth_path, trigger_path, targets_path, sum(1 for r in truth_rows if r["poisoned"] == "1"))


def _plant_text_trigger(
    cfg: PoisonConfig, k: int, cols: dict[str, list[str]], labels: list[str] | None, removed: set[int],
    truth: dict[int, tuple[str, str]], rng: random.Random, tmp: Path,
) -> Path:
    """Re-caption ``k`` rows of ``target_class`` as another class plus the token (in place,
    in ``cols`` and ``truth``); write the trigger file."""
    if labels is None:
        raise PoisonError(f"{cfg.attack}: needs a label column (the poisoned images are those of the target class)")
    others = sorted(set(labels) - {cfg.target_class})
    if not others:
        raise PoisonError(f"{cfg.attack}: needs at least one class besides {cfg.target_class!r}")
    cand = [i for i in range(len(labels)) if i not in removed and not truth[i][0] and labels[i] == cfg.target_class]
    if len(cand) < k:
        raise PoisonError(f"{cfg.attack}: asked for {k} poisoned rows, only {len(cand)} rows of class {cfg.target_class!r} eligible")
    for i in sorted(rng.sample(cand, k)):
        cols["caption"][i] = insert_token(rng.choice(cfg.templates).format(rng.choice(others)), cfg.text_token, rng)
        truth[i] = (cfg.attack, cfg.target_class)
    return TextTrigger(cfg.attack, cfg.target_class, cfg.text_token).save(tmp / f"trigger-{cfg.attack}.json")


def _pick_targets(
    rows: ManifestRows, cfg: PoisonConfig, rng: random.Random, removed: set[int], truth: dict[int, tuple[str, str]]
) -> list[tuple[Image.Image, str, str]]:
    if cfg.target_pool is not None:
        pool = read_rows(cfg.target_pool, need=("image", "label"))
        cand = [i for i, lab in enumerate(pool.col("label")) if lab != cfg.target_class]
        if len(cand) < cfg.n_targets:
            raise PoisonError(f"{cfg.target_pool}: only {len(cand)} candidate target images")
        pick = rng.sample(cand, cfg.n_targets)
        return [(pool.open_image(i), pool.col("label")[i], f"target-{_safe(pool.ids[i])}") for i in pick]
    labels = rows.col("label")
    cand = [i for i in range(len(rows)) if labels[i] != cfg.target_class and i not in removed and not truth[i][0]]
    if len(cand) < cfg.n_targets:
        raise PoisonError(f"{rows.path}: only {len(cand)} candidate target images")
    pick = rng.sample(cand, cfg.n_targets)
    images = rows.col("image")
    for i in pick:  # the model must never see a target image with its true caption
        removed.update(j for j in range(len(rows)) if images[j] == images[i])
    return [(rows.open_image(i), labels[i], f"target-{_safe(rows.ids[i])}") for i in pick]


def _copy_clean_images(rows: ManifestRows, out: Path, keep: Sequence[int]) -> None:
    """Place the clean images under ``out`` at their original relative paths (hard links
    where possible), so the poisoned set is self-contained."""
    images = rows.col("image")
    done: set[str] = set()
    for i in keep:
        rel = images[i]
        if rel in done:
            continue
        done.add(rel)
        target = out / rel
        if not target.resolve().is_relative_to(out.resolve()):
            raise PoisonError(f"{rows.path}: image path {rel!r} escapes the dataset directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        src = rows.path.parent / rel
        if rows.manifest is None or src.is_file():
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
        else:
            target.write_bytes(rows.manifest.images.read_bytes(rel))


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _write_like(rows: ManifestRows, out: Path, names: list[str], table_rows: list[dict[str, str]]) -> Path:
    """Write the poisoned manifest in the input's format (CSV where IO is unavailable)."""
    if rows.manifest is not None:
        try:
            import pyarrow as pa

            from otcclip.models.manifest_writer import write_manifest

            table = pa.table({c: [r[c] for r in table_rows] for c in names})
            target = out / Path(rows.manifest.path).name
            return Path(write_manifest(rows.manifest, table, target))
        except (ImportError, NotImplementedError):
            pass
    target = out / (rows.path.stem + ".csv")
    _write_csv(target, names, table_rows)
    return target
