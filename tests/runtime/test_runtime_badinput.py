"""Bad input never stops a run: every kind of odd file either works or gets a clear per-file error."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import struct
import zlib

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("onnxruntime")

from effiseg.runtime import Segmenter  # noqa: E402
from effiseg.runtime.cli import run_command  # noqa: E402
from effiseg.runtime.images import ImageError, read_image  # noqa: E402


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size (a decompression bomb's header) with almost no data."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def tiff16_rgb(arr: np.ndarray) -> bytes:
    """An uncompressed 16-bit RGB TIFF, written by hand (baseline tags only)."""
    h, w, _ = arr.shape
    data = arr.astype("<u2").tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, None), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    ifd_size = 2 + len(entries) * 12 + 4
    bps_offset = 8 + ifd_size
    data_offset = bps_offset + 6
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bps_offset, 273: data_offset}.get(tag, value)
        out += (struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1
                else struct.pack("<HHII", tag, kind, count, value))
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def base_rgb() -> np.ndarray:
    yy, xx = np.mgrid[0:90, 0:120]
    rgb = np.stack([xx * 2, yy * 2, (xx + yy) % 256], axis=2).astype(np.uint8)
    rgb[30:60, 40:90] = (230, 80, 60)
    return rgb


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, base_rgb):
    """name -> expected ("ok", reference RGB it must segment like) or ("error", words in the message)."""
    folder = tmp_path_factory.mktemp("zoo")
    rgb = Image.fromarray(base_rgb)
    good_jpeg = _encoded(rgb, "JPEG", quality=95)
    gray16 = (base_rgb[..., 0].astype(np.uint16) * 200)
    rgb16 = base_rgb.astype(np.uint16) * 257 + 3
    stack = io.BytesIO()
    rgb.save(stack, format="TIFF", save_all=True, append_images=[Image.fromarray(255 - base_rgb)])
    files = {
        "ok_rgb.jpg": (good_jpeg, ("ok", np.asarray(Image.open(io.BytesIO(good_jpeg)).convert("RGB")))),
        "upper_case.JPG": (good_jpeg, ("ok", None)),
        "gray.png": (_encoded(rgb.convert("L"), "PNG"), ("ok", np.asarray(rgb.convert("L").convert("RGB")))),
        "rgba.png": (_encoded(Image.fromarray(np.dstack([base_rgb, np.full(base_rgb.shape[:2], 7, np.uint8)])), "PNG"),
                     ("ok", base_rgb)),
        "palette.png": (_encoded(rgb.convert("P"), "PNG"), ("ok", np.asarray(rgb.convert("P").convert("RGB")))),
        "bilevel.bmp": (_encoded(rgb.convert("1"), "BMP"), ("ok", np.asarray(rgb.convert("1").convert("RGB")))),
        "cmyk.jpg": (_encoded(rgb.convert("CMYK"), "JPEG", quality=95), ("ok", None)),
        "gray16.png": (_encoded(Image.fromarray(gray16), "PNG"),
                       ("ok", np.repeat((gray16 / gray16.max() * 255).astype(np.uint8)[..., None], 3, 2))),
        "gray16.tif": (_encoded(Image.fromarray(gray16), "TIFF"),
                       ("ok", np.repeat((gray16 / gray16.max() * 255).astype(np.uint8)[..., None], 3, 2))),
        "rgb16.png": (png16_rgb(rgb16), ("ok", (rgb16 >> 8).astype(np.uint8))),
        "rgb16.tif": (tiff16_rgb(rgb16), ("ok", (rgb16 >> 8).astype(np.uint8))),
        "frames.tif": (stack.getvalue(), ("ok", base_rgb)),
        "one_pixel.png": (_encoded(Image.fromarray(base_rgb[:1, :1]), "PNG"), ("ok", base_rgb[:1, :1])),
        "empty.jpg": (b"", ("error", "empty file")),
        "random_bytes.jpg": (np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                             ("error", "not a readable image")),
        "text.png": (b"this is a text file, not a picture\n" * 20, ("error", "not a readable image")),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], ("error", "truncated")),
        "bad_idat.png": (_encoded(rgb, "PNG")[:60] + b"\x00" * 200, ("error", "corrupt or truncated")),
        "bomb.png": (png_header_only(40_000, 40_000), ("error", "image is over the limit of")),
        "large.png": (_encoded(Image.fromarray(np.zeros((400, 400, 3), np.uint8)), "PNG"), ("error", "megapixels")),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image extension: never listed")
    expected = {name: expect for name, (_, expect) in files.items()}
    try:
        (folder / "dangling.jpg").symlink_to(folder / "moved-away.jpg")
        expected["dangling.jpg"] = ("error", "broken symbolic link")
    except (OSError, NotImplementedError):  # Windows without the symlink privilege
        pass
    return folder, expected


def test_every_odd_file_works_or_fails_clearly(zoo, tiny_onnx, tmp_path):
    folder, expected = zoo
    with Segmenter.from_onnx(tiny_onnx, max_batch=3) as seg:
        summary = seg.run_folder(folder, tmp_path / "out", max_pixels=300 * 300)
        rows = {r["file"]: r for r in summary["files"]}
        assert set(rows) == set(expected)  # notes.txt is not an image file
        for name, (status, detail) in expected.items():
            row = rows[name]
            assert row["status"] == status, (name, row)
            mask_path = tmp_path / "out" / row["mask"]
            if status == "error":
                assert row["error"] and detail in row["error"], (name, row["error"])
                assert not mask_path.exists()
                continue
            mask = np.asarray(Image.open(mask_path))
            src = read_image(folder / name, max_pixels=10**9)
            assert mask.shape == src.shape[:2] == (row["height"], row["width"])
            if detail is not None:
                # The decoding policy: this file must segment exactly like its reference RGB.
                assert np.array_equal(src, detail), name
                assert np.array_equal(mask == 255, seg.segment([detail])[0]), name
    assert summary["n_failed"] == sum(s == "error" for s, _ in expected.values())
    assert summary["n_ok"] == sum(s == "ok" for s, _ in expected.values())


def test_bomb_and_limit_messages(zoo):
    folder, _ = zoo
    with pytest.raises(ImageError, match="megapixels|decompression"):
        read_image(folder / "bomb.png")
    with pytest.raises(ImageError, match=r"400x400 = 0\.2 megapixels, over the limit of 0\.1"):
        read_image(folder / "large.png", max_pixels=100_000)
    assert read_image(folder / "large.png").shape == (400, 400, 3)  # fine under the default limit


def test_cli_reports_failures_and_exits_non_zero(zoo, tiny_onnx, tmp_path):
    folder, expected = zoo
    out = tmp_path / "cli_out"
    result = CliRunner().invoke(run_command, ["--input", str(folder), "--output", str(out), "--model",
                                              str(tiny_onnx), "--no-progress", "--max-pixels", "90000"])
    assert result.exit_code == 1, result.output
    assert "FAILED empty.jpg: empty file (0 bytes)" in result.output
    n_ok = sum(s == "ok" for s, _ in expected.values())
    assert f"{n_ok} ok" in result.output
    assert len(list(out.glob("*.png"))) == n_ok


# Root reads any file whatever its mode (CI runs as root), so there the check runs in a child process
# that first gives up root for the unprivileged "nobody" user.
_READ_AS_NOBODY = """
import os, sys
from PIL import Image
from effiseg.runtime.images import ImageError, read_image
Image.init()  # every image plugin loaded while the interpreter's own files are still readable
os.setgid(65534)
os.setuid(65534)
try:
    read_image(sys.argv[1])
except ImageError as e:
    print(e)
"""


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes (Windows: the locked-file test below)")
@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_file_that_cannot_be_opened_is_not_called_corrupt(tmp_path, where):
    """``file``: the file's mode forbids reading; ``folder``: the folder holding it may not be entered."""
    import tempfile
    from effiseg.runtime.images import ImageError, read_image
    # A folder others may enter (pytest's own are private to their owner), or not, as the case asks.
    folder = Path(tempfile.mkdtemp(dir=tmp_path if where == "folder" else None))
    folder.chmod(0o755)
    path = folder / "locked.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    if where == "file":
        path.chmod(0)
    else:
        folder.chmod(0)
    try:
        if os.geteuid() != 0:
            with pytest.raises(ImageError) as raised:
                read_image(path)
            message = str(raised.value)
        else:
            proc = subprocess.run([sys.executable, "-c", _READ_AS_NOBODY, str(path)], capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            message = proc.stdout.strip()
        assert "cannot read file" in message and "corrupt" not in message, message
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
        if where == "file":
            import shutil
            shutil.rmtree(folder)


def test_a_locked_file_is_reported_as_unreadable_not_corrupt(tmp_path, monkeypatch):
    """Windows: a file another program holds open without sharing fails to open with PermissionError."""
    from effiseg.runtime import images
    path = tmp_path / "locked.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(images.Image, "open", refuse)
    with pytest.raises(images.ImageError, match="cannot read file: Permission denied"):
        images.read_image(path)
