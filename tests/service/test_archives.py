"""Archive and image guards the service relies on: decompression bombs stopped while
streaming, compressed tars stored decompressed once at upload, a pixel cap checked before
decoding, and archive indexes reused instead of rebuilt on every open: per process, and
stored beside the archive at upload."""

from __future__ import annotations

import io
import struct
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from otcclip.models import stores
from otcclip.models.images import ArchiveError, ArchiveLimits, UnreadableImage, decode_image
from otcclip.models.stores import (
    TarImageStore,
    ZipImageStore,
    decompress_tar,
    index_path,
    open_store,
)
from tests.service.conftest import Api


class _Zeros(io.RawIOBase):
    """``n`` zero bytes as a readable stream (a member body that is never held in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _png(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _bomb(path: Path, mode: str, n: int) -> Path:
    """A tar holding ``a.png`` and ``n`` zero bytes as ``zeros.bmp``, compressed with ``mode``."""
    with tarfile.open(path, mode, **({"preset": 0} if mode == "w:xz" else {})) as tf:  # type: ignore[call-overload]
        png = _png()
        info = tarfile.TarInfo("a.png")
        info.size = len(png)
        tf.addfile(info, io.BytesIO(png))
        info = tarfile.TarInfo("zeros.bmp")
        info.size = n
        tf.addfile(info, io.BufferedReader(_Zeros(n), 1 << 20))
    return path


def _temp_tars() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("otcclip-*.tar")}


class _Sink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)


@pytest.mark.parametrize(("mode", "size"), [("w:gz", 256 << 20), ("w:bz2", 64 << 20), ("w:xz", 64 << 20)])
def test_decompression_bombs_stop_at_the_ratio_while_streaming(tmp_path, mode, size):
    bomb = _bomb(tmp_path / f"bomb.{mode[2:]}", mode, size)
    assert bomb.stat().st_size < size // 100  # a real bomb: far over the ratio of 100
    sink = _Sink()
    t0 = time.monotonic()
    with pytest.raises(ArchiveError, match="compression ratio"):
        decompress_tar(bomb, sink)  # type: ignore[arg-type]
    assert sink.n < 16 << 20, f"{sink.n} bytes written before the bomb was noticed"
    assert time.monotonic() - t0 < 5
    before = _temp_tars()
    with pytest.raises(ArchiveError, match="compression ratio"):
        TarImageStore(bomb)
    assert _temp_tars() <= before  # its temporary plain tar is gone too


def test_decompression_stops_at_the_size_cap(tmp_path):
    bomb = _bomb(tmp_path / "big.tar.gz", "w:gz", 32 << 20)
    sink = _Sink()
    with pytest.raises(ArchiveError, match="decompressed size exceeds"):
        decompress_tar(bomb, sink, limits=ArchiveLimits(max_total_bytes=4 << 20, max_members=10, max_ratio=1e9))  # type: ignore[arg-type]
    assert sink.n <= (4 << 20) + (1 << 20) + 20480


def _crafted_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels."""
    data = bytearray(_png((4, 4)))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    body = bytearray(data[ihdr + 8: ihdr + 8 + 13])
    body[0:8] = struct.pack(">II", width, height)
    data[ihdr + 8: ihdr + 8 + 13] = body
    data[ihdr + 21: ihdr + 25] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns at open; the cap refuses
def test_pixel_cap_is_checked_before_decoding(tmp_path):
    huge = _crafted_png(12_000, 12_000)
    assert len(huge) < 1024
    with pytest.raises(UnreadableImage, match="too large.*12000 x 12000"):
        decode_image(huge, name="huge.png")  # the default cap
    with pytest.raises(UnreadableImage, match="too large"):
        decode_image(_png((16, 16)), max_pixels=255)
    assert decode_image(_png((16, 16)), max_pixels=256).size == (16, 16)
    z = tmp_path / "i.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("small.png", _png((10, 10)))
        zf.writestr("big.png", _png((40, 40)))
    store = open_store(z, limits=ArchiveLimits(max_image_pixels=1000))
    assert store.open("small.png").size == (10, 10)
    with pytest.raises(UnreadableImage, match="too large"):
        store.open("big.png")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "big.png").write_bytes(_png((40, 40)))
    with pytest.raises(UnreadableImage, match="too large"):
        open_store(d, limits=ArchiveLimits(max_image_pixels=1000)).open("big.png")


def test_service_limits_carry_the_pixel_cap():
    from otcclip.service.core.config import Settings
    from otcclip.service.manifests import archive_limits

    assert archive_limits(Settings(max_image_pixels=1234)).max_image_pixels == 1234


def test_archive_index_is_built_once_per_version(tmp_path):
    z = tmp_path / "many.zip"
    n = 30_000
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            zf.writestr(f"dir/{i}.png", b"x")
    t0 = time.perf_counter()
    first = ZipImageStore(z)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = ZipImageStore(z)
    reuse = time.perf_counter() - t0
    assert len(first.names()) == len(second.names()) == n and second.exists(f"{n - 1}.png")
    assert reuse < build / 10, (build, reuse)
    with zipfile.ZipFile(z, "w") as zf:  # a new version of the file is indexed again
        zf.writestr("other/new.png", b"y")
    assert ZipImageStore(z).names() == ["other/new.png"]
    t = tmp_path / "plain.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo("a.png")
        png = _png()
        info.size = len(png)
        tf.addfile(info, io.BytesIO(png))
    assert TarImageStore(t).read_bytes("a.png") == TarImageStore(t).read_bytes("a.png") == png


@pytest.fixture(scope="module")
def api(embedded) -> Api:
    a = Api(embedded.url, embedded.create_key("archives"))
    a.storage_root = embedded.settings.storage_root  # type: ignore[attr-defined]
    return a


def test_upload_stores_a_compressed_tar_decompressed_once(api, tmp_path):
    members = {f"{i}.png": _png(color=(i * 20, 0, 0)) for i in range(5)}
    tgz = tmp_path / "images.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"top/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\n" + "".join(f"{k},red square {k}\n" for k in members))
    r = api.upload(manifest, tgz)
    assert r.status_code == 201, r.text
    ds = r.json()
    stored = Path(api.storage_root) / "datasets" / ds["id"]  # type: ignore[attr-defined]
    assert sorted(p.name for p in stored.iterdir()) == ["images.tar", "images.tar.index", "manifest.csv"]
    assert TarImageStore(stored / "images.tar")._tmp is None  # a plain tar: nothing to decompress on open
    rows = api.http.get(f"/v1/datasets/{ds['id']}/rows").json()
    assert rows["total"] == 5


def test_upload_of_a_tar_gz_bomb_is_refused_quickly(api, tmp_path):
    bomb = _bomb(tmp_path / "bomb.tar.gz", "w:gz", 512 << 20)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\na.png,x\n")
    t0 = time.monotonic()
    r = api.upload(manifest, bomb)
    assert r.status_code == 422 and "compression ratio" in r.json()["message"], r.text
    assert time.monotonic() - t0 < 10
    assert "bomb.tar.gz" in r.json()["message"] and str(api.storage_root) not in r.text  # type: ignore[attr-defined]


def test_zip_members_read_concurrently_from_one_parsed_archive(tmp_path):
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    members = {f"m/{i}.bin": bytes([i % 256]) * (1000 + i) for i in range(300)}
    z = tmp_path / "c.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    store = ZipImageStore(z)
    clone = pickle.loads(pickle.dumps(store))
    names = list(members) * 4
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda k: (store if hash(k) % 2 else clone).read_bytes(k), names))
    assert got == [members[k] for k in names]
    store.close()
    assert clone.read_bytes("m/7.bin") == members["m/7.bin"]


def _zip_of_every_method(path: Path, n: int = 40) -> dict[str, bytes]:
    """A zip whose members use each compression method zipfile writes (lzma is read through
    the fallback), with a directory entry and a common top folder."""
    members = {f"top/{i}.png": _png(color=(i * 5, 7, 0)) + bytes(i) for i in range(n)}
    methods = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("top/", b"")
        for i, (k, v) in enumerate(members.items()):
            zf.writestr(k, v, compress_type=methods[i % len(methods)])
    return members


def _tar_of(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_stored_index_is_loaded_instead_of_parsing_and_a_stale_one_is_rebuilt(tmp_path, kind):
    path = tmp_path / f"images.{kind}"
    members = _zip_of_every_method(path) if kind == "zip" else {f"top/{i}.png": _png(color=(i, 0, 0)) for i in range(40)}
    if kind == "tar":
        _tar_of(path, members)
    cls = ZipImageStore if kind == "zip" else TarImageStore
    stores.clear_index_cache()
    before = dict(stores.INDEX_COUNTS)
    first = cls(path)
    assert first.save_index() == [index_path(path)] and index_path(path).is_file()

    def counts() -> dict[str, int]:
        return {k: stores.INDEX_COUNTS[k] - before.get(k, 0) for k in ("parsed", "loaded")}

    stores.clear_index_cache()  # another process: the index file instead of the archive
    second = cls(path)
    assert counts() == {"parsed": 1, "loaded": 1}
    assert sorted(second.names()) == sorted(first.names()) == sorted(members)
    assert all(second.read_bytes(k.removeprefix("top/")) == v for k, v in members.items())
    second.close()

    stores.clear_index_cache()  # other limits than the index was checked against: parsed again
    assert cls(path, limits=ArchiveLimits(max_members=10_000)).names()
    assert counts() == {"parsed": 2, "loaded": 1}

    time.sleep(0.01)  # the archive replaced by another version: its stale index is rebuilt
    replaced = {"top/new.png": _png(color=(0, 0, 255))}
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("top/new.png", replaced["top/new.png"])
    else:
        _tar_of(path, replaced)
    stores.clear_index_cache()
    third = cls(path)
    assert third.names() == ["top/new.png"] and third.read_bytes("new.png") == replaced["top/new.png"]
    assert counts() == {"parsed": 3, "loaded": 1}
    stores.clear_index_cache()
    assert cls(path).names() == ["top/new.png"]  # the rewritten index matches the new version
    assert counts() == {"parsed": 3, "loaded": 2}

    index_path(path).write_bytes(b"not an index")  # unreadable: parsed (and rewritten)
    stores.clear_index_cache()
    assert cls(path).names() == ["top/new.png"]
    assert counts() == {"parsed": 4, "loaded": 2}
    stores.clear_index_cache()
    cls(path)
    assert counts() == {"parsed": 4, "loaded": 3}


def test_zip_members_read_from_the_index_are_checked_against_their_crc(tmp_path):
    z = tmp_path / "c.zip"
    data = bytes(range(256)) * 40
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.bin", data)
        zf.writestr("b.bin", b"b")
    raw = bytearray(z.read_bytes())
    raw[raw.index(data) + 100] ^= 0xFF  # one flipped byte in a stored member
    z.write_bytes(bytes(raw))
    store = ZipImageStore(z)
    assert store.read_bytes("b.bin") == b"b"
    with pytest.raises(OSError, match="corrupt.*CRC"):
        store.read_bytes("a.bin")
    with pytest.raises(UnreadableImage):
        store.open("a.bin")


def test_upload_stores_the_archive_index_and_later_opens_load_it(api, tmp_path, tiny_dataset):
    r = api.upload(tiny_dataset["manifest"], tiny_dataset["images"])
    assert r.status_code == 201, r.text
    ds = r.json()
    stored = Path(api.storage_root) / "datasets" / ds["id"]  # type: ignore[attr-defined]
    assert (stored / "images.zip.index").is_file()
    from otcclip.service.api.routes.datasets import clear_preview_cache

    stores.clear_index_cache()  # as in a fresh API process or a worker
    clear_preview_cache()
    parsed, loaded = stores.INDEX_COUNTS["parsed"], stores.INDEX_COUNTS["loaded"]
    rows = api.http.get(f"/v1/datasets/{ds['id']}/rows").json()
    assert rows["total"] == 40
    assert stores.INDEX_COUNTS["parsed"] == parsed and stores.INDEX_COUNTS["loaded"] == loaded + 1
    # the next page comes from the kept manifest table: no archive open at all
    counts = dict(stores.INDEX_COUNTS)
    page = api.http.get(f"/v1/datasets/{ds['id']}/rows", params={"offset": 10, "limit": 5}).json()
    assert page["total"] == 40 and page["rows"] == rows["rows"][10:15]
    assert dict(stores.INDEX_COUNTS) == counts
