"""How the pages show what people gave them: user text as literal markdown, pictures as small encoded images.

Plain functions, no Streamlit: the pages call them once per upload or per saved record and cache the result.
"""

from __future__ import annotations

import base64
import io
import re
import string

from PIL import Image

from classes import CLASSES

CARD_SIZE = 220   # pixels: the width of a card on the main page
PICTURE_SIZE = 512  # the one-at-a-time view's large picture (the decoded copy is at most this big)
THUMBNAIL_SIZE = 96

# The one-at-a-time view's keys: the ten classes on the digits in CIFAR-10's order (1 = airplane ... 0 = truck).
CLASS_KEYS = dict(zip(CLASSES, "1234567890"))
KEYBOARD = (
    ("`1` … `9`, `0`", "the class, in CIFAR-10's order: "
     + ", ".join(f"{key} {label}" for label, key in CLASS_KEYS.items()) + "; then the next picture"),
    ("`Enter`", "the prediction is right: confirm it; then the next picture"),
    ("`X`", "skip: leave the picture out of the save; then the next picture"),
    ("`Backspace`", "back to the previous picture (to change its label)"),
    ("`Ctrl+Enter`", "Save: the same as the button, with its undo"),
)


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


def keyboard_help() -> str:
    """The key table of the one-at-a-time view, as markdown (the page's Keyboard help and the README show it)."""
    return "| key | what it does |\n|---|---|\n" + "\n".join(f"| {keys} | {does} |" for keys, does in KEYBOARD)
