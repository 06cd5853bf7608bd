"""A minimal reader for uncompressed DICOM files, enough for the test images pydicom ships.

Chosen over a pydicom dependency: the embedded dataset only needs Rows/Columns, a few display
attributes and uncompressed pixel data, and ~150 lines keep the library's dependency list short.
Supported: Part 10 files in Implicit VR Little Endian (1.2.840.10008.1.2) or Explicit VR Little
Endian (1.2.840.10008.1.2.1), MONOCHROME1/2 or RGB, 8/16-bit, first frame only. Anything else
raises :class:`DicomError` saying so (decode such files with pydicom instead).
Reference: DICOM PS3.5 sections 7.1 (data elements), 7.5 (sequences), 8 (pixel data).
"""
from __future__ import annotations

import struct

import numpy as np
from PIL import Image

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}  # PS3.5 7.1.2: these have 2 reserved bytes and a 32-bit length
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
PIXEL_DATA = (0x7FE0, 0x0010)
# The attributes read, with how to decode them (needed for Implicit VR, where the file has no VR).
TAGS = {
    (0x0002, 0x0010): ("TransferSyntaxUID", "str"), (0x0008, 0x0060): ("Modality", "str"),
    (0x0008, 0x1030): ("StudyDescription", "str"), (0x0018, 0x0015): ("BodyPartExamined", "str"),
    (0x0028, 0x0002): ("SamplesPerPixel", "us"), (0x0028, 0x0004): ("PhotometricInterpretation",
                                                                     "str"),
    (0x0028, 0x0006): ("PlanarConfiguration", "us"), (0x0028, 0x0008): ("NumberOfFrames", "num"),
    (0x0028, 0x0010): ("Rows", "us"), (0x0028, 0x0011): ("Columns", "us"),
    (0x0028, 0x0100): ("BitsAllocated", "us"), (0x0028, 0x0103): ("PixelRepresentation", "us"),
    (0x0028, 0x1050): ("WindowCenter", "num"), (0x0028, 0x1051): ("WindowWidth", "num"),
    (0x0028, 0x1052): ("RescaleIntercept", "num"), (0x0028, 0x1053): ("RescaleSlope", "num"),
}


class DicomError(ValueError):
    """The file is not a DICOM file this reader supports."""


def read_dicom(path: str) -> tuple[dict, np.ndarray]:
    """Return (attributes by keyword, pixel array of the first frame after rescale)."""
    with open(path, "rb") as handle:
        buf = handle.read()
    if buf[128:132] != b"DICM":
        raise DicomError(f"{path}: no 'DICM' marker at byte 128; not a DICOM Part 10 file")
    attrs: dict = {}
    pos = _parse(buf, 132, attrs, explicit=True, stop_group=0x0002)  # file meta: always explicit
    syntax = attrs.get("TransferSyntaxUID", "")
    if syntax not in (IMPLICIT_LE, EXPLICIT_LE):
        raise DicomError(f"{path}: transfer syntax {syntax or '(none)'} is compressed or big "
                         "endian; only uncompressed little endian is supported (use pydicom)")
    _parse(buf, pos, attrs, explicit=(syntax == EXPLICIT_LE))
    if "PixelData" not in attrs:
        raise DicomError(f"{path}: no pixel data")
    return attrs, _pixels(attrs, path)


def _parse(buf: bytes, pos: int, attrs: dict, explicit: bool, stop_group: int | None = None,
           end: int | None = None) -> int:
    """Read elements from ``pos`` until ``end``/EOF, a group other than ``stop_group``, or an
    item/sequence delimiter; store known tags in ``attrs``; return the position reached."""
    end = len(buf) if end is None else end
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", buf, pos)
        if stop_group is not None and group != stop_group:
            return pos
        if (group, element) in (_ITEM_END, _SEQ_END):
            return pos + 8
        vr, length, pos = _header(buf, pos, explicit)
        if length == _UNDEFINED:
            if (group, element) == PIXEL_DATA:
                raise DicomError("encapsulated (compressed) pixel data is not supported")
            pos = _skip_sequence(buf, pos, explicit)
            continue
        value = buf[pos:pos + length]
        pos += length
        if (group, element) == PIXEL_DATA:
            attrs["PixelData"] = value
            return pos
        if (group, element) in TAGS:
            name, kind = TAGS[(group, element)]
            attrs[name] = _decode(value, kind)
    return pos


def _header(buf: bytes, pos: int, explicit: bool) -> tuple[bytes | None, int, int]:
    group = struct.unpack_from("<H", buf, pos)[0]
    if explicit and group != 0xFFFE:  # item tags never carry a VR
        vr = buf[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            return vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        return vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
    return None, struct.unpack_from("<I", buf, pos + 4)[0], pos + 8


def _skip_sequence(buf: bytes, pos: int, explicit: bool) -> int:
    """Skip an undefined-length sequence: items (defined or undefined length) until its
    Sequence Delimitation Item (PS3.5 7.5.2)."""
    while pos + 8 <= len(buf):
        tag = struct.unpack_from("<HH", buf, pos)
        length = struct.unpack_from("<I", buf, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag == _ITEM and length != _UNDEFINED:
            pos += length
        elif tag == _ITEM:
            pos = _parse(buf, pos, {}, explicit)  # stops after the Item Delimitation Item
    raise DicomError("sequence without its delimiter (truncated file?)")


def _decode(value: bytes, kind: str):
    if kind == "us":
        return struct.unpack_from("<H", value)[0] if len(value) >= 2 else None
    text = value.decode("ascii", errors="replace").strip("\x00 ")
    if kind == "num":  # DS/IS, possibly multi-valued "40\\400": keep the first
        first = text.split("\\")[0].strip()
        return float(first) if first else None
    return text


def _pixels(attrs: dict, path: str) -> np.ndarray:
    rows, cols = attrs["Rows"], attrs["Columns"]
    bits, samples = attrs.get("BitsAllocated", 16), attrs.get("SamplesPerPixel", 1)
    if bits not in (8, 16):
        raise DicomError(f"{path}: {bits}-bit pixels are not supported")
    dtype = {8: np.uint8, 16: np.uint16}[bits]
    if attrs.get("PixelRepresentation") == 1:
        dtype = {8: np.int8, 16: np.int16}[bits]
    count = rows * cols * samples
    data = np.frombuffer(attrs["PixelData"], dtype=np.dtype(dtype).newbyteorder("<"),
                         count=count)
    if samples == 1:
        pixels = data.reshape(rows, cols).astype(np.float64)
        slope, intercept = attrs.get("RescaleSlope") or 1.0, attrs.get("RescaleIntercept") or 0.0
        return pixels * slope + intercept
    if attrs.get("PlanarConfiguration", 0) == 1:  # RRR...GGG...BBB
        return data.reshape(samples, rows, cols).transpose(1, 2, 0)
    return data.reshape(rows, cols, samples)


def dicom_to_image(path: str) -> tuple[Image.Image, dict]:
    """Decode to an 8-bit PIL image (grey images windowed by the file's Window Center/Width when
    present, else stretched min..max; MONOCHROME1 inverted) and return it with the attributes."""
    attrs, pixels = read_dicom(path)
    photometric = attrs.get("PhotometricInterpretation", "MONOCHROME2")
    if pixels.ndim == 3:
        if photometric != "RGB":
            raise DicomError(f"{path}: colour space {photometric} is not supported (RGB only)")
        return Image.fromarray(pixels.astype(np.uint8), "RGB"), attrs
    center, width = attrs.get("WindowCenter"), attrs.get("WindowWidth")
    if center is not None and width:
        low, high = center - width / 2, center + width / 2
    else:
        low, high = float(pixels.min()), float(pixels.max())
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
    return Image.fromarray(scaled.round().astype(np.uint8), "L"), attrs
