"""Images for the judge: downscaled JPEG, base64 data URL, and a content hash for the cache."""
from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

from PIL import Image


def load_image(image) -> Image.Image:
    """Open a path, raw encoded bytes or a PIL image (raises ValueError otherwise)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, (str, Path)):
        return Image.open(image)
    raise ValueError(f"image must be a path, bytes or PIL.Image, got {type(image).__name__}")


def encode_image(image, max_side: int) -> tuple[str, str]:
    """Return ``(data_url, sha256_hex)`` of the image as RGB JPEG, longer side <= ``max_side``.

    Downscaling keeps requests small (a 4k slide tile is ~10 MB as base64 PNG) and the hash of
    the *encoded* bytes is what the cache keys on, so the same picture given as a path or as a
    PIL image hits the same cache entry.
    """
    img = load_image(image)
    img.load()
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), hashlib.sha256(data).hexdigest()
