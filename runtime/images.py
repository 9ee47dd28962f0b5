"""Image files in and out: which files count as images, how every kind of image is decoded to RGB,
and how results are written so that a killed run never leaves a half-written file.

Decoding policy (the same as training's ``read_rgb``, so the runtime sees what evaluation saw):
* RGB is used as stored; grayscale, palette, CMYK, 1-bit and RGBA/LA/PA images are converted to RGB
  (alpha is dropped, not composited: colour values under transparent pixels are kept).
* 16-bit grayscale (PIL modes ``I;16*`` and ``I``) is scaled by the image's own maximum to 0..255;
  16-bit RGB PNG is reduced to 8 bits by PIL itself (high byte).
* Multi-frame files (TIFF stacks, animations): the first frame.
* EXIF orientation is ignored: masks align pixel for pixel with the image as stored.
* Images over ``max_pixels`` (default: PIL's decompression-bomb limit, about 89.5 MP) are refused
  with a per-file error before any pixel is decoded, which also bounds memory per decoder thread.
* Empty, truncated, corrupt and non-image files raise :class:`ImageError` with the reason.

Codec: JPEG files (``.jpg``/``.jpeg`` whose bytes start with a JPEG marker) are decoded by
simplejpeg (libjpeg-turbo, accurate DCT and fancy upsampling: the same pixels as Pillow's decoder on
every Kvasir-SEG image, benchmarks/results/host-pipeline-2026-12-08/decode_identity.json), because
it decodes about twice as fast as Pillow and holds no GIL while it does, so decoder threads scale
with cores. Everything else, and any JPEG it declines (CMYK/YCCK, over ``max_pixels``, corrupt or
truncated), goes through Pillow, whose errors are the ones reported. Without simplejpeg installed
(it is a core dependency with wheels for every platform we support) Pillow decodes everything.
"""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from itertools import count
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .replace_file import replace_with_retry

try:
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the install; Pillow decodes everything then
    simplejpeg = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default Image.MAX_IMAGE_PIXELS
TEMP_SUFFIX = ".effiseg-tmp"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_IDAT_MAX = 1 << 30  # bytes of the deflate stream per IDAT chunk (the format allows 2**31 - 1)
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
# Colour spaces whose decoding to RGB matches Pillow's (CMYK and YCCK are inverted differently).
_FAST_JPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_temp_counter = count()
_pid = os.getpid()  # os.getpid() is a system call; a forked child (never effiseg's own) takes its own
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: globals().update(_pid=os.getpid()))
_WRITE_BUFFER = 1 << 16
_pil_limit_lock = threading.Lock()


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the reason, for the summary."""


def allow_pixels(max_pixels: int) -> None:
    """Raise PIL's process-wide decompression-bomb limit to at least ``max_pixels`` so that PIL does
    not refuse images that our own (per-run) limit accepts. Never lowers it."""
    with _pil_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and max_pixels > current:
            Image.MAX_IMAGE_PIXELS = int(max_pixels)


def natural_key(text: str) -> list:
    """Sort key that orders 2.jpg before 10.jpg (case-insensitive otherwise)."""
    parts, number, word = [], "", ""
    for c in text:
        if c.isdigit():
            if word:
                parts.append((1, 0, word.lower()))
                word = ""
            number += c
        else:
            if number:
                parts.append((0, int(number), ""))
                number = ""
            word += c
    if number:
        parts.append((0, int(number), ""))
    if word:
        parts.append((1, 0, word.lower()))
    return parts


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files (by extension, any case) under ``folder``, in natural order of their paths
    relative to ``folder``."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.glob("*")
    # A broken symbolic link is listed too: it then fails with its reason instead of vanishing.
    found = [p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS
             and (p.is_file() or (p.is_symlink() and not p.exists()))]
    return sorted(found, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def to_rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any PIL image, with the policy of the module docstring."""
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)
        arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to (H, W, 3) uint8 RGB or raise :class:`ImageError` saying why not."""
    path = path if isinstance(path, Path) else Path(path)  # Path(a Path) parses it again, under the GIL
    source: Path | io.BytesIO = path
    if simplejpeg is not None and path.suffix.lower() in _JPEG_SUFFIXES:
        # The common case first, in as few system calls as it takes (each one hands the GIL to
        # another thread); a file that cannot be read is looked at below, where the reason is found.
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.readall()
        except OSError:
            data = b""
        if data:
            rgb = _decode_jpeg_fast(data, max_pixels)
            if rgb is not None:
                return rgb
            source = io.BytesIO(data)  # Pillow decodes it, or says what is wrong with it
    try:
        size = path.stat().st_size
    except OSError as e:
        try:
            broken_link = path.is_symlink()
        except OSError:  # a folder on the way this user may not enter: is_symlink raises too
            broken_link = False
        if broken_link:
            raise ImageError(f"broken symbolic link: its target {os.readlink(path)} does not exist") from None
        raise ImageError(f"cannot read file: {e.strerror or e}") from e
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                                 f"{max_pixels / 1e6:.1f} (raise it with --max-pixels / max_pixels)")
            if w == 0 or h == 0:
                raise ImageError(f"image has no pixels ({w}x{h})")
            im.load()
            return to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a readable image: PIL cannot identify the contents of this "
                         f"{path.suffix or 'extension-less'} file") from None
    except Image.DecompressionBombError as e:
        # PIL refuses at twice its own limit before the header is handed over: same wording as ours.
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if max_pixels < pil_limit:
            raise ImageError(f"image is over the limit of {max_pixels / 1e6:.1f} megapixels (PIL: {e}); "
                             "raise it with --max-pixels / max_pixels") from None
        raise ImageError(f"image is over PIL's process-wide limit of {pil_limit / 1e6:.1f} megapixels (PIL: {e}); "
                         "effiseg-run raises it to --max-pixels, API callers with "
                         "effiseg.runtime.images.allow_pixels(max_pixels)") from None
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        # The file could not be opened at all (no read permission; on Windows, locked by another
        # program): its contents were never seen, so it is not called corrupt.
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    except OSError as e:
        # Truncated files land here ("image file is truncated (N bytes not processed)").
        raise ImageError(f"corrupt or truncated image: {e}") from None
    except MemoryError:
        raise ImageError("not enough memory to decode this image") from None
    except Exception as e:  # PIL raises assorted errors (SyntaxError, ValueError, struct.error) on bad data
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None


def _decode_jpeg_fast(data: bytes, max_pixels: int) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB from JPEG bytes by simplejpeg, or None to leave the file to Pillow
    (not a JPEG, a colour space Pillow converts differently, over the limit, or unreadable: Pillow
    then gives the error message, the same as for every other format)."""
    if not data.startswith(_JPEG_SIGNATURE):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _FAST_JPEG_COLORSPACES or not 0 < width * height <= max_pixels:
            return None
        # strict: a corrupt or truncated file raises instead of decoding to grey padding.
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except (ValueError, RuntimeError, MemoryError):
        return None


MAX_NAME_BYTES = 255  # a file name's limit on ext4, APFS, NTFS (there in UTF-16 units) and most others


def _temp_name(name: str) -> str:
    """The temporary name for ``name``: the name itself where it fits, so that a stray file says
    whose it was; for a name near the file-name limit a short stand-in (the mask name itself is
    legal, so its temporary must be too)."""
    tail = f".{_pid}-{next(_temp_counter)}{TEMP_SUFFIX}"
    if len(f".{name}{tail}".encode("utf-8")) <= MAX_NAME_BYTES:
        return f".{name}{tail}"
    import hashlib
    return f".{hashlib.sha256(name.encode('utf-8')).hexdigest()[:16]}{tail}"


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, then rename it over ``path``.

    A process killed at any moment leaves either the old file, no file, or the complete new one;
    never a partial ``path`` (a stray ``*.effiseg-tmp`` at most, which the next run deletes).
    """
    tmp = path.with_name(_temp_name(path.name))
    try:
        # The folder is made only when it is missing (a sub-folder of a recursive run), and the
        # buffer size is given (so open() asks no fstat and no isatty): the writer threads write one
        # mask per image, and every system call hands the GIL over.
        try:
            f = open(tmp, "wb", buffering=_WRITE_BUFFER)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb", buffering=_WRITE_BUFFER)
        with f:
            write(f)
        replace_with_retry(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        # Windows' path limit shows up as a bare "not found"; any other error is left as it is.
        too_long = _over_windows_path_limit(path, tmp) if isinstance(e, FileNotFoundError) else None
        if too_long:
            raise FileNotFoundError(e.errno, too_long, str(path)) from e
        raise


# O_EXCL: the temporary name is this process's own (pid and counter), so an existing file there is not
# ours to truncate. O_BINARY: Windows would otherwise translate newlines in the PNG's bytes.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def write_whole(path: str | os.PathLike, data: bytes) -> None:
    """``data`` as ``path``, replaced whole, as :func:`atomic_write` does, in the fewest system calls:
    open, write, close, rename (no file object: ``open()`` adds an fstat, and each call hands the GIL
    to another thread, which the writer threads pay once per mask). The names are put together as
    strings, not Path objects: pathlib's parsing holds the GIL, once per mask."""
    target = os.fspath(path)
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, _temp_name(name))
    try:
        try:
            fd = os.open(tmp, _CREATE_FLAGS, 0o666)
        except FileNotFoundError:
            os.makedirs(folder or os.curdir, exist_ok=True)
            fd = os.open(tmp, _CREATE_FLAGS, 0o666)
        try:
            view = memoryview(data)
            while view:  # a write may take less than asked (a full disk raises instead)
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        replace_with_retry(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        too_long = _over_windows_path_limit(Path(target), Path(tmp)) if isinstance(e, FileNotFoundError) else None
        if too_long:
            raise FileNotFoundError(e.errno, too_long, target) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` as a UTF-8 file, replaced whole (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(Path(path), lambda f: f.write(data))


_ON_WINDOWS = os.name == "nt"
WINDOWS_MAX_PATH = 260  # MAX_PATH, in force unless long paths are enabled (Windows 10 default: not)


def _over_windows_path_limit(path: Path, tmp: Path) -> str | None:
    """Why writing ``path`` (through ``tmp``, its longer temporary name) was "not found", when it is
    Windows' path-length limit; None elsewhere."""
    length = len(str(Path(tmp).absolute()))
    if not _ON_WINDOWS or length < WINDOWS_MAX_PATH:
        return None
    return (f"the path is too long for Windows ({length} characters with the temporary name, limit "
            f"{WINDOWS_MAX_PATH - 1}) unless long paths are enabled (LongPathsEnabled): choose a shorter "
            "--output folder")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A 2-D mask (nonzero = foreground) as the bytes of a 0/255 8-bit grayscale PNG.

    Written here rather than by PIL because the pipeline's writer threads encode one mask per
    image: PIL's encoder runs a Python loop over chunks under the GIL, while numpy's copy and
    zlib's deflate and CRC release it, so this path is both faster on one thread and parallel
    across them (benchmarks/RESULTS.md, "Host-side cost of the pipeline"). The format is the
    plain one every reader takes: filter type 0 on every row, deflate level 1 with run-length
    matching (masks compress well at any level; level 6 costs several times the CPU), IDAT chunks of
    at most 1 GiB.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask PNG needs a non-empty 2-D mask, got shape {mask.shape}")
    h, w = mask.shape
    scanlines = np.empty((h, w + 1), np.uint8)
    scanlines[:, 0] = 0  # each row starts with its filter type: 0, none
    if mask.dtype == bool:  # 0/1 bytes -> 0/255 by wrapping negation: no cast, one pass
        np.negative(mask.view(np.uint8), out=scanlines[:, 1:])
    else:
        np.multiply(mask.astype(bool), np.uint8(255), out=scanlines[:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no interlace
    # Level 1 with the run-length strategy: on the Kvasir-SEG test masks no slower than level 1's
    # default strategy (0.218 against 0.254 ms in the last run) and files 2.4x smaller, 668 bytes on
    # average (benchmarks/results/host-pipeline-2026-12-08/png_settings.json). Level 0 (stored) makes
    # 80x larger files for no gain; a 1-bit PNG costs a third (0.079 ms) but reads back in Pillow as
    # mode "1" (True/False), not the 0/255 masks users load, so it is not written.
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    stream = packer.compress(scanlines.data) + packer.flush()  # the array's own buffer: no copy
    # A chunk holds at most 2**31 - 1 bytes; split the stream (only gigapixel masks come near that).
    idats = [_png_chunk(b"IDAT", stream[i:i + _IDAT_MAX]) for i in range(0, len(stream), _IDAT_MAX)]
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", header), *idats, _PNG_IEND])


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """``encode_mask_png(mask)`` written atomically to ``path``."""
    write_whole(path, encode_mask_png(mask))


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    image = Image.fromarray(rgb, mode="RGB")
    atomic_write(path, lambda f: image.save(f, format="JPEG", quality=quality))


def png_is_complete(path: Path) -> bool:
    """True for a file that starts with the PNG signature and ends with the IEND chunk: what a
    finished mask looks like (a file cut short by a crash or a full disk does not)."""
    try:
        size = path.stat().st_size
        if size < len(_PNG_SIGNATURE) + len(_PNG_IEND):
            return False
        with open(path, "rb") as f:
            head = f.read(len(_PNG_SIGNATURE))
            f.seek(-len(_PNG_IEND), os.SEEK_END)
            tail = f.read()
        return head == _PNG_SIGNATURE and tail == _PNG_IEND
    except OSError:
        return False


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temporary files a killed run left under ``folder``; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for p in folder.rglob(f"*{TEMP_SUFFIX}"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def overlay_image(rgb: np.ndarray, mask: np.ndarray, fill=(0, 255, 0), outline=(255, 255, 0),
                  alpha: float = 0.35) -> np.ndarray:
    """The image with a translucent fill over the mask and an opaque outline around it. The
    outline is about 1/300 of the smaller side thick so that it stays visible on large images."""
    mask = mask.astype(bool)
    out = rgb.astype(np.float32)
    out[mask] = out[mask] * (1.0 - alpha) + np.asarray(fill, np.float32) * alpha
    edge = mask & ~_erode(mask)
    for _ in range(max(0, round(min(mask.shape) / 300) - 1)):
        edge = _dilate(edge) & mask
    out[edge] = outline
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; pixels on the image border count as inside (no outline along it)."""
    padded = np.pad(mask, 1, mode="edge")
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
            | padded[1:-1, :-2] | padded[1:-1, 2:])
