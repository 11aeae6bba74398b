"""How the pages show what people gave them: user text as literal markdown, pictures as small encoded images.

Plain functions, no Streamlit: the pages call them once per upload or per saved record and cache the result.
"""

from __future__ import annotations

import base64
import io
import re
import string

from PIL import Image

CARD_SIZE = 220   # pixels: the width of a card on the main page
THUMBNAIL_SIZE = 96


PUNCTUATION = re.compile(f"([{re.escape(string.punctuation)}])")
# Streamlit's markdown makes links, icons or other characters of these in the parsed text, however their characters
# were backslash-escaped (www.x, http://x, a@b.c, :material_x:, :streamlit:, ->): such a word becomes a code span.
REWRITTEN = re.compile(r"://|www\.|@|:material_|:streamlit:|^(<->|->|<-|--|>=|<=|~=)$", re.IGNORECASE)


def _one_line(text: str) -> str:
    """White space as HTML shows it, one space per run: a line break could start a list, heading or code block."""
    return re.sub(r"\s+", " ", text.replace("\x00", "\ufffd"))


def code_span(text: str) -> str:
    """Text as an inline code span, where markdown makes nothing: the fence is longer than any run of backticks in
    the text, and a space each side lets the text start or end with one."""
    text = _one_line(text)
    if not text.strip():
        return text
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def escape_markdown(text: str) -> str:
    """User-supplied text (file names, URLs, labels, error messages that quote them) shown as itself: every ASCII
    punctuation mark escaped, so no link, emphasis, HTML or directive; a word Streamlit would still link or swap
    for an icon is a code span."""
    return " ".join(code_span(word) if REWRITTEN.search(word) else PUNCTUATION.sub(r"\\\1", word)
                    for word in _one_line(text).split(" "))


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
