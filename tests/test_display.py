"""display.py: user text stays literal markdown; pictures are encoded small, once."""

from __future__ import annotations

import base64
import io

from PIL import Image

from display import data_url, encode_image, escape_markdown


def test_escape_markdown_keeps_user_text_literal():
    escaped = escape_markdown("[click](http://x) **b** <img src=x> :red[x] $x$ a\x00b")
    for token in ("\\[", "\\]", "\\*", "\\<", "\\:", "\\$"):
        assert token in escaped
    assert "\x00" not in escaped


def test_encode_image_keeps_the_aspect_and_bounds_the_size():
    jpeg = encode_image(Image.new("RGB", (1000, 500), (10, 200, 30)), 220)
    small = Image.open(io.BytesIO(jpeg))
    assert small.format == "JPEG" and small.size == (220, 110)
    assert encode_image(Image.new("RGB", (50, 40)), 220) and Image.open(io.BytesIO(encode_image(
        Image.new("RGB", (50, 40)), 220))).size == (50, 40)  # never enlarged


def test_data_url_round_trips():
    jpeg = encode_image(Image.new("RGB", (30, 30), (255, 0, 0)), 30)
    url = data_url(jpeg)
    assert url.startswith("data:image/jpeg;base64,") and base64.b64decode(url.split(",", 1)[1]) == jpeg


def test_thumbnail_of_saved_bytes_is_a_small_jpeg():
    from display import THUMBNAIL_SIZE, thumbnail

    buffer = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(buffer, "PNG")
    small = Image.open(io.BytesIO(thumbnail(buffer.getvalue(), "photo.png")))
    assert small.format == "JPEG" and small.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE // 2)
