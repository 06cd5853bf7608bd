"""Images for the judge: downscaled JPEG, base64 data URL, and a content hash for the cache.

Decoding and hashing are the ones every package uses (``data.readers.read_image`` and
``sha256_hex``), so a picture hashes the same here as in a dataset manifest.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from data.readers import read_image, sha256_hex


def load_image(image) -> Image.Image:
    """RGB image from a path, raw encoded bytes or a PIL image (raises ValueError otherwise)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return read_image(bytes(image))
    if isinstance(image, (str, Path)):
        return read_image(str(image))
    raise ValueError(f"image must be a path, bytes or PIL.Image, got {type(image).__name__}")


def encode_image(image, max_side: int) -> tuple[str, str]:
    """Return ``(data_url, sha256_hex)`` of the image as RGB JPEG, longer side <= ``max_side``.

    Downscaling keeps requests small (a 4k slide tile is ~10 MB as base64 PNG) and the hash of
    the *encoded* bytes is what the cache keys on, so the same picture given as a path or as a
    PIL image hits the same cache entry.
    """
    img = load_image(image)   # a copy: thumbnail() below never touches the caller's image
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), sha256_hex(data)
