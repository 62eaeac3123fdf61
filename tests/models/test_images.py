"""Safe image stores: path refusal, archive checks (zip bombs, links), decoding, batches."""

from __future__ import annotations

import gzip
import io
import pickle
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from otcclip.models.images import (
    ArchiveError,
    ArchiveLimits,
    UnreadableImage,
    UnsafePath,
    decode_image,
    load_images,
    safe_relpath,
)
from otcclip.models.stores import (
    DirImageStore,
    TarImageStore,
    ZipImageStore,
    open_store,
)


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255.0


@pytest.mark.parametrize("ref", ["/etc/passwd", "\\\\server\\x.jpg", "C:/x.jpg", "../x.jpg", "a/../../x.jpg",
                                 "a/..", "", "  ", "http://example.com/x.jpg", "file:///etc/passwd", "a\x00b"])
def test_safe_relpath_refuses(ref: str) -> None:
    with pytest.raises(UnsafePath):
        safe_relpath(ref)


def test_safe_relpath_normalises() -> None:
    assert safe_relpath("./images//a.jpg") == "images/a.jpg"
    assert safe_relpath("images\\b.png") == "images/b.png"


def test_dir_store_refuses_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(_png((255, 0, 0)))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png((0, 255, 0)))
    (root / "images" / "link.png").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "images" / "a.png")
    store = DirImageStore(root)
    assert store.exists("images/a.png")
    assert store.exists("inner.png")  # a link that stays inside is fine
    assert not store.exists("images/missing.png")
    with pytest.raises(UnsafePath, match="outside"):
        store.exists("images/link.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(_png((0, 0, 0)))
    (root / "images" / "dirlink").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePath, match="outside"):
        store.exists("images/dirlink/x.png")
    with pytest.raises(UnsafePath):
        store.open("../secret.png")
    assert store.open("images/a.png").getpixel((0, 0)) == (255, 0, 0)


def test_truncated_jpeg_is_unreadable(tmp_path: Path) -> None:
    good = _jpeg(0)
    assert decode_image(good).size == (24, 24)
    with pytest.raises(UnreadableImage):
        decode_image(good[: len(good) // 2])
    with pytest.raises(UnreadableImage):
        decode_image(b"not an image at all")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(UnreadableImage):  # formats that would run external programs are refused
        decode_image(eps)


def test_load_images_marks_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "b.jpg").write_bytes(_jpeg(1)[:300])
    (tmp_path / "c.png").write_bytes(_png((0, 0, 255)))
    store = DirImageStore(tmp_path)
    refs = ["a.png", "b.jpg", "c.png", "missing.png", "../x.png"]
    batch = load_images(store, refs, _to_tensor)
    assert batch.pixels.shape == (5, 3, 8, 8)
    assert batch.ok.tolist() == [True, False, True, False, False]
    assert torch.allclose(batch.pixels[0], _to_tensor(Image.new("RGB", (8, 8), (255, 0, 0))))
    assert torch.allclose(batch.pixels[2, 2], torch.ones(8, 8))  # blue channel of c.png, order kept
    assert batch.pixels[1].abs().sum() == 0 and batch.errors[1] and not batch.errors[0]
    none_ok = load_images(store, ["missing.png"], _to_tensor)
    assert none_ok.ok.tolist() == [False] and none_ok.pixels.shape == (1, 3, 8, 8)


def _zip(path: Path, members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes], mode: Literal["w", "w:gz"] = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_archive_store_reads_lazily_and_pickles(tmp_path: Path, kind: str) -> None:
    members = {"top/images/a.png": _png((255, 0, 0)), "top/images/b.jpg": _jpeg(2)}
    path = tmp_path / f"imgs.{kind}"
    if kind == "zip":
        _zip(path, members)
    else:
        _tar(path, members, "w:gz" if kind == "tar.gz" else "w")
    store = open_store(path)
    assert isinstance(store, ZipImageStore if kind == "zip" else TarImageStore)
    assert store.exists("top/images/a.png") and store.exists("images/a.png")  # common top folder
    assert not store.exists("images/c.png")
    assert store.read_bytes("images/b.jpg") == members["top/images/b.jpg"]
    clone = pickle.loads(pickle.dumps(store))
    assert clone.open("images/a.png").getpixel((1, 1)) == (255, 0, 0)
    store.close()
    clone.close()


def test_zip_bomb_member_refused(tmp_path: Path) -> None:
    bomb = _zip(tmp_path / "bomb.zip", {"images/a.png": _png((1, 2, 3)), "images/zeros.bmp": bytes(4 << 20)})
    with pytest.raises(ArchiveError, match=r"images/zeros\.bmp.*compression ratio"):
        ZipImageStore(bomb)  # default limits: ratio 100 above 1 MiB
    limits = ArchiveLimits(max_ratio=10_000)
    assert ZipImageStore(bomb, limits=limits).exists("images/zeros.bmp")


def test_zip_limits_total_size_and_count(tmp_path: Path) -> None:
    members = {f"m{i}.png": _png((i, i, i)) for i in range(5)}
    z = _zip(tmp_path / "many.zip", members, compression=zipfile.ZIP_STORED)
    with pytest.raises(ArchiveError, match="members exceed"):
        ZipImageStore(z, limits=ArchiveLimits(max_members=4))
    size = len(members["m0.png"])
    with pytest.raises(ArchiveError, match="total uncompressed size.*m2.png"):
        ZipImageStore(z, limits=ArchiveLimits(max_total_bytes=int(2.5 * size)))
    with pytest.raises(ArchiveError, match="m0.png.*over the limit"):
        ZipImageStore(z, limits=ArchiveLimits(max_member_bytes=size - 1))


def test_zip_symlink_and_unsafe_names_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/a.png", _png((1, 1, 1)))
        info = zipfile.ZipInfo("images/evil.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="evil.png.*symlink"):
        ZipImageStore(path)
    for name in ("../escape.png", "/abs.png"):
        p = tmp_path / "bad.zip"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr(name, _png((1, 1, 1)))
        with pytest.raises(ArchiveError, match="refused"):
            ZipImageStore(p)


@pytest.mark.parametrize("kind", ["sym", "hard", "dev", "dotdot", "abs"])
def test_tar_unsafe_members_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tf:
        data = _png((1, 1, 1))
        info = tarfile.TarInfo("images/a.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        bad = tarfile.TarInfo({"dotdot": "../x.png", "abs": "/x.png"}.get(kind, "images/b.png"))
        if kind == "sym":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hard":
            bad.type, bad.linkname = tarfile.LNKTYPE, "images/a.png"
        elif kind == "dev":
            bad.type = tarfile.CHRTYPE
        if kind in ("dotdot", "abs"):
            bad.size = len(data)
            tf.addfile(bad, io.BytesIO(data))
        else:
            tf.addfile(bad)
    with pytest.raises(ArchiveError) as ei:
        TarImageStore(path)
    assert ("x.png" if kind in ("dotdot", "abs") else "images/b.png") in str(ei.value)


def test_tar_gz_bomb_refused(tmp_path: Path) -> None:
    path = _tar(tmp_path / "bomb.tar.gz", {"a.bmp": bytes(3 << 20)}, "w:gz")
    with pytest.raises(ArchiveError, match="compression ratio"):
        TarImageStore(path)
    with pytest.raises(ArchiveError, match="decompressed size exceeds"):
        TarImageStore(path, limits=ArchiveLimits(max_total_bytes=1 << 20, max_members=10, max_ratio=1e9))
    raw = tmp_path / "junk.tar.gz"
    raw.write_bytes(gzip.compress(b"not a tar" * 100))
    with pytest.raises(ArchiveError, match="tar"):
        TarImageStore(raw)


def test_tar_gz_temp_file_removed(tmp_path: Path) -> None:
    path = _tar(tmp_path / "ok.tar.gz", {"a.png": _png((9, 9, 9))}, "w:gz")
    store = TarImageStore(path)
    tmp = store._tmp
    assert tmp is not None and Path(tmp).exists()
    assert store.open("a.png").getpixel((0, 0)) == (9, 9, 9)
    store.close()
    assert not Path(tmp).exists()
