"""The minimal DICOM reader against pydicom's shipped test files (values checked with pydicom
3.0.2 once and written here)."""
import pytest

from data.embedded.dicom import DicomError, dicom_to_image, read_dicom
from data.embedded.fetch import find, wheel_files


def _file(name):
    """pydicom's test file, as data.embedded.fetch copied it out of the pinned wheel."""
    item = next(w for w in wheel_files() if w.file == f"pydicom/data/test_files/{name}")
    path = find(item)
    assert path is not None, f"{name} is not fetched: run python -m data.embedded.fetch"
    return str(path)


def test_ct_small_hounsfield_values():
    attrs, pixels = read_dicom(_file("CT_small.dcm"))
    assert attrs["Modality"] == "CT" and pixels.shape == (128, 128)
    assert attrs["RescaleIntercept"] == -1024.0
    assert (pixels[0, 0], pixels.min(), pixels.max()) == (-849.0, -896.0, 1167.0)


def test_implicit_and_explicit_vr_agree():
    attrs, explicit = read_dicom(_file("MR_small.dcm"))
    _, implicit = read_dicom(_file("MR_small_implicit.dcm"))
    assert (explicit == implicit).all() and explicit[0, 0] == 905
    assert (attrs["WindowCenter"], attrs["WindowWidth"]) == (600.0, 1600.0)


def test_window_and_rgb_to_image():
    image, _ = dicom_to_image(_file("MR_small.dcm"))
    # 905 in window 600 +- 800 -> (905 - (-200)) / 1600 * 255 = 176.1 -> 176
    assert image.mode == "L" and image.getpixel((0, 0)) == 176
    colour, attrs = dicom_to_image(_file("examples_rgb_color.dcm"))
    assert colour.mode == "RGB" and colour.size == (320, 240) and attrs["Modality"] == "US"


def test_unsupported_inputs_are_named(tmp_path):
    with pytest.raises(DicomError, match="1.2.840.10008.1.2.5 is compressed"):
        read_dicom(_file("MR_small_RLE.dcm"))
    (tmp_path / "x.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(DicomError, match="no 'DICM' marker"):
        read_dicom(str(tmp_path / "x.dcm"))
