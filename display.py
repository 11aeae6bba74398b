"""How the pages show what people gave them: user text as literal markdown, pictures as small encoded images.

Plain functions, no Streamlit: the pages call them once per upload or per saved record and cache the result.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

CARD_SIZE = 220   # pixels: the width of a card on the main page
THUMBNAIL_SIZE = 96


def escape_markdown(text: str) -> str:
    """User-supplied names are shown as literal text: no links, emphasis or HTML from a crafted file name."""
    special = "\\`*_{}[]<>#+-!|~$:"
    return "".join("\\" + ch if ch in special else ch for ch in text.replace("\x00", "\ufffd"))


def encode_image(image: Image.Image, size: int) -> bytes:
    """A copy at most `size` pixels on its longest side, as JPEG bytes: encoded once, sent as is on every rerun."""
    copy = image.copy()
    copy.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buffer = io.BytesIO()
    copy.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def thumbnail(data: bytes, name: str) -> bytes:
    """History's small JPEG of a saved image's bytes (checked and decoded as any upload is)."""
    from inputs import load_image

    return encode_image(load_image(data, name), THUMBNAIL_SIZE)


def data_url(jpeg: bytes) -> str:
    """Encoded image bytes as a data: URL, for table cells that take an image address."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
