"""Image checking and re-encoding for the sharding tool.

Why a module of its own: deciding whether an input image is usable is the expensive part of a
conversion (a full decode), so it runs in worker processes, and the same rules must give the
same answer on a resumed run. Every shard holds RGB JPEG bytes: the original bytes when they
already are one (passthrough, no quality loss), otherwise a re-encode. Memory per call is one
decoded image; nothing grows with the dataset.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile

# A truncated JPEG must fail the check, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

OK, CONVERT, REJECT = "ok", "convert", "reject"


@dataclass(frozen=True)
class Check:
    """Verdict on one input: ``action`` is ok / convert / reject, ``code`` a short reason
    category (counted in the manifest), ``reason`` the human-readable detail."""

    action: str
    code: str = ""
    reason: str = ""


def check_bytes(data: bytes, *, allow_convert: bool = True) -> Check:
    """Full validity check: PIL ``verify`` (structure, CRCs) then a full decode (truncation).

    RGB JPEGs pass through; other decodable images (PNG, CMYK/grayscale/palette JPEG, ...)
    are converted to RGB JPEG when ``allow_convert``, else rejected with the reason.
    """
    if len(data) == 0:
        return Check(REJECT, "empty_file", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode = im.format, im.mode
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
    except Image.UnidentifiedImageError:
        return Check(REJECT, "not_an_image", "not a recognised image format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Check(REJECT, "too_large", f"image too large: {e}")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        if "truncat" in text.lower():
            return Check(REJECT, "truncated", f"truncated image: {text}")
        return Check(REJECT, "undecodable", f"cannot decode: {text}")
    if size[0] < 1 or size[1] < 1:
        return Check(REJECT, "undecodable", f"degenerate size {size}")
    if fmt == "JPEG" and mode == "RGB":
        return Check(OK)
    what = f"{fmt} {mode}" if fmt != "JPEG" else f"{mode} JPEG"
    if not allow_convert:
        return Check(REJECT, "not_rgb_jpeg", f"{what} image (conversion disabled)")
    return Check(CONVERT, "converted", f"{what} image converted to RGB JPEG")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparent pixels go on white (as a viewer shows them)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = im.point(lambda v: v * (1 / 256)).convert("L") if im.mode != "F" else im.convert("L")
    return im.convert("RGB")


def encode(data: bytes, check: Check, *, max_side: int | None = None, quality: int = 90) -> bytes:
    """The bytes a shard stores: the original for an RGB JPEG that needs no resize, else an RGB
    JPEG re-encode (resized so its longer side is ``max_side``; never upscaled)."""
    if check.action == REJECT:
        raise ValueError(f"cannot encode a rejected image ({check.reason})")
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        needs_resize = max_side is not None and max(w, h) > max_side
        if check.action == OK and not needs_resize:
            return data
        if needs_resize:
            scale = max_side / max(w, h)
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            if im.format == "JPEG":
                im.draft("RGB", target)  # DCT-domain downscale to >= target: much faster decode
            rgb = to_rgb(im)
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        else:
            rgb = to_rgb(im)
            rgb.load()
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=int(quality), optimize=False, subsampling="4:2:0")
    return buf.getvalue()


def decode_check(data: bytes) -> str | None:
    """What ``verify`` asks of a stored image: a fully decodable RGB JPEG. None if fine, else why."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is the finding
        return f"cannot decode: {e}"
    if fmt != "JPEG" or mode != "RGB":
        return f"stored image is {fmt} {mode}, expected RGB JPEG"
    return None
