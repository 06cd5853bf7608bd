"""The shared low-level readers: sha256 of bytes, text and files; image decoding and sniffing."""
import hashlib
import io

import pytest
from PIL import Image, UnidentifiedImageError

from data.readers import file_sha256, image_format, read_image, sha256_hex, write_image_bytes


def test_sha256_of_bytes_text_and_file(tmp_path):
    blob = bytes(range(256)) * 9000  # > 1 MiB: read in several blocks
    (tmp_path / "f.bin").write_bytes(blob)
    assert file_sha256(str(tmp_path / "f.bin")) == sha256_hex(blob) == \
        hashlib.sha256(blob).hexdigest()
    assert sha256_hex("é") == hashlib.sha256("é".encode("utf-8")).hexdigest()


def test_read_image_from_path_or_bytes_is_rgb(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    data = (tmp_path / "g.png").read_bytes()
    for source in (str(tmp_path / "g.png"), data):
        image = read_image(source)
        assert image.mode == "RGB" and image.size == (5, 4)
        assert image.getpixel((0, 0)) == (77, 77, 77)
    assert image_format(data) == "PNG" and image_format(str(tmp_path / "g.png"), verify=True) == "PNG"


def test_read_image_page_and_errors(tmp_path):
    pages = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    pages[0].save(tmp_path / "p.tif", save_all=True, append_images=pages[1:])
    assert read_image(str(tmp_path / "p.tif"), page=1).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(UnidentifiedImageError):
        read_image(b"not an image")


def test_write_image_bytes_names_by_content_hash(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buffer, "JPEG")
    path = write_image_bytes(buffer.getvalue(), None, str(tmp_path))
    assert path == str(tmp_path / (sha256_hex(buffer.getvalue())[:20] + ".jpg"))
    assert write_image_bytes(b"junk", None, str(tmp_path)).endswith(".bin")
