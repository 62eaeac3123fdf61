"""The RoCLIP and SafeCLIP baselines follow their sources: image-query FIFO caption bank
every K-th epoch; unimodal warm-up and a safe set that grows each epoch."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from otcclip.models.training import TrainConfig, train
from otcclip.models.training.defences import Context, RoClip, SafeClip


def _ctx(n: int, **config: object) -> Context:
    return Context(
        model=None, tokenizer=None, config=TrainConfig(**config), images=None,  # type: ignore[arg-type]
        captions=[f"c{i % 3}" for i in range(n)], ids=[str(i) for i in range(n)],
        tokens=torch.zeros(n, 4, dtype=torch.long), mean=(0.0,), std=(1.0,),
        device=torch.device("cpu"), run_dir=Path("."),
    )


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from otcclip.models.datasets import digits_manifest

    d = tmp_path_factory.mktemp("digits")
    with digits_manifest(d, split="train").open() as f:
        rows = list(csv.DictReader(f))[:192]
    out = d / "small.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_roclip_memory_bank_is_fifo() -> None:
    d = RoClip(_ctx(10, defence="roclip", pool_fraction=0.5))  # a bank of 5 captions
    assert d.bank_size == 5
    e = torch.eye(8)
    for ids in ([0, 1], [2, 3], [4, 5], [6, 7]):
        d.enqueue(e[ids], torch.tensor(ids))
    # [4, 5] reached the end: 4 filled the last slot, 5 was dropped, the pointer wrapped;
    # [6, 7] then replaced the oldest entries 0 and 1
    assert d.bank_ids.tolist() == [6, 7, 2, 3, 4]
    assert d.bank_ptr == 2
    assert torch.equal(d.bank[0], e[6]) and torch.equal(d.bank[4], e[4])


def test_roclip_queries_the_bank_with_the_image_embedding() -> None:
    d = RoClip(_ctx(10, defence="roclip", pool_fraction=0.5))
    e = torch.eye(5)
    d.enqueue(e, torch.arange(5))
    # image 0's own caption is caption 0 (e0) but its image embedding is nearest e3
    image = torch.tensor([[0.1, 0.0, 0.2, 0.9, 0.0]])
    nn, ids = d.query(image)
    assert ids.tolist() == [3] and torch.equal(nn[0], e[3])


def test_roclip_bank_starts_with_random_entries_and_survives_a_checkpoint() -> None:
    d = RoClip(_ctx(10, defence="roclip", pool_fraction=0.5))
    _, ids = d.query(torch.randn(3, 4))
    assert (ids == -1).all()  # nothing enqueued yet: lightly's random initial bank
    d.enqueue(torch.eye(4)[:2], torch.tensor([7, 8]))
    e = RoClip(_ctx(10, defence="roclip", pool_fraction=0.5))
    e.load_state_dict(d.state_dict())
    assert e.bank_ids.tolist() == d.bank_ids.tolist() and e.bank_ptr == 2 and torch.equal(e.bank, d.bank)


def test_roclip_schedule_defaults_to_the_official_even_epochs() -> None:
    d = RoClip(_ctx(10, defence="roclip"))
    # official: 1-based epochs with epoch % break_epoch == 0, break_epoch = 2
    assert [e + 1 for e in range(8) if d.is_rematch_epoch(e)] == [2, 4, 6, 8]


def test_roclip_trains_every_kth_epoch_on_image_matched_bank_captions(small_manifest: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="otc-micro", defence="roclip", epochs=3, batch_size=32, device="cpu", lr_warmup_steps=2,
                      pool_fraction=0.25)
    res = train(small_manifest, tmp_path, config=cfg)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert ["roclip" in x for x in lines] == [False, True, False]
    assert ["clip" in x for x in lines] == [True, False, True]
    state = torch.load(tmp_path / "checkpoints" / "epoch_003" / "train_state.pt", weights_only=False)["defence"]
    matched, own = state["matched"], torch.arange(192)
    assert (matched >= -1).all()  # every image queried the bank in epoch 2
    # the bank was filled with this epoch's captions (48 slots, 192 pairs): no random entry is left
    assert (state["bank_ids"] >= 0).all()
    # by image the matches are not the own caption: a caption-query of templated captions
    # would return its own text for almost every image
    with small_manifest.open() as f:
        captions = [r["caption"] for r in csv.DictReader(f)]
    same_text = np.mean([m >= 0 and captions[m] == captions[i] for i, m in zip(own.tolist(), matched.tolist(), strict=True)])
    assert same_text < 0.9
    assert abs(lines[1]["nn_same_text"] - same_text) < 0.5


def test_safeclip_safe_set_grows_each_epoch_within_the_gmm_clean_pairs() -> None:
    n = 100
    d = SafeClip(_ctx(n, defence="safeclip", warmup_epochs=2, rematch_every=3, safe_start=0.2, safe_growth=0.1))
    rng = np.random.default_rng(0)
    cos = np.concatenate([rng.normal(0.6, 0.05, 80), rng.normal(0.1, 0.05, 20)])  # 20 poisoned, low cosine
    post, clean = d.split(cos)
    assert clean[:80].all() and not clean[80:].any()
    d.cosine, d.clean = torch.from_numpy(cos), torch.from_numpy(clean)
    sets = []
    for epoch in range(2, 12):
        d.grow(epoch)
        sets.append(d.safe.clone())
    sizes = [int(s.sum()) for s in sets]
    assert sizes[:6] == [min(80, math.ceil((0.2 + 0.1 * k) * n)) for k in range(6)]
    assert sizes[-1] == 80  # capped by the GMM's clean component
    assert all(bool((a <= b).all()) for a, b in zip(sets, sets[1:], strict=False))  # nested
    assert not any(bool(s[80:].any()) for s in sets)
    top = torch.argsort(torch.from_numpy(cos), descending=True)[:20]
    assert sets[0][top].all()  # the first safe set is the highest cosines
    assert d.safe_share(1) == 0.0


def test_safeclip_trains_unimodal_then_grows_its_safe_set(small_manifest: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="otc-micro", defence="safeclip", epochs=4, batch_size=32, device="cpu", lr_warmup_steps=2,
                      warmup_epochs=2, rematch_every=2, safe_start=0.2, safe_growth=0.1)
    res = train(small_manifest, tmp_path, config=cfg)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert "clip" not in lines[0] and "unimodal" in lines[0]  # unimodal warm-up
    assert "clip" in lines[1]  # its last epoch adds CLIP
    safe = [x["rematch"]["keep"] for x in lines[2:]]
    assert safe[0] <= math.ceil(0.2 * 192) and safe[0] < safe[1] <= math.ceil(0.3 * 192)
    assert (tmp_path / "rematch" / "epoch_002" / "decisions.parquet").is_file()
