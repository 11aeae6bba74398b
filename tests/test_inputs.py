"""load_image and read_image_input: every kind of bad file is refused by name, every good one becomes upright RGB."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import inputs
from conftest import image_bytes
from inputs import InvalidImageError, load_image, read_image_input


def png_declaring(width: int, height: int) -> bytes:
    """A tiny but valid-looking PNG whose header claims a huge size (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def refused(data: bytes, name: str = "upload.jpg") -> str:
    with pytest.raises(InvalidImageError) as caught:
        load_image(data, name)
    message = str(caught.value)
    assert name in message, message
    return message


def test_empty_file():
    assert "empty" in refused(b"")


def test_text_renamed_to_jpg():
    assert "text file" in refused(b"just some notes, not a picture\n")


def test_pdf_renamed_to_jpg():
    assert "PDF" in refused(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n")


def test_truncated_jpeg():
    data = image_bytes("JPEG", size=(256, 256))
    assert "truncated" in refused(data[: len(data) // 2])


def test_png_with_bad_crc():
    data = bytearray(image_bytes("PNG"))
    data[29] ^= 0xFF  # inside the IHDR chunk's CRC
    assert "starts like a PNG file but its header is damaged" in refused(bytes(data), "broken.png")


def test_png_cut_mid_stream():
    data = image_bytes("PNG", size=(300, 300), color=(10, 200, 90))
    message = refused(data[: len(data) - 40], "cut.png")
    assert "truncated" in message or "damaged" in message


def test_decompression_bomb_refused_before_decoding():
    message = refused(png_declaring(30000, 30000), "bomb.png")
    assert "megapixels" in message and "900000000" in message


def test_our_pixel_cap_applies_below_pillows_guard():
    assert "9000x8000" in refused(png_declaring(9000, 8000), "wide.png")  # 72 MP: Pillow only warns at 89 MP


def test_pillow_bomb_warning_is_an_error_not_a_warning(monkeypatch):
    """Even under our own pixel cap, Pillow's guard must raise rather than warn."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    message = refused(image_bytes("PNG", size=(40, 40)), "small-bomb.png")  # 1600 px: a warning, not yet an error
    assert "small-bomb.png" in message


@pytest.mark.parametrize("image_format, what", [("TIFF", "TIFF"), ("BMP", "BMP"), ("PSD", "Photoshop"), ("EPS", "EPS")])
def test_formats_outside_the_allow_list(image_format, what):
    if image_format == "PSD":
        data = b"8BPS\x00\x01" + b"\x00" * 40  # Pillow cannot write PSD; its signature is enough
    elif image_format == "EPS":
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    else:
        data = image_bytes(image_format)
    assert what in refused(data, "renamed.jpg")


def test_file_over_the_size_limit(monkeypatch):
    monkeypatch.setattr(inputs, "MAX_FILE_BYTES", 1000)
    assert "limit" in refused(image_bytes("PNG", size=(200, 200), color=(1, 2, 3), compress_level=0), "big.png")


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (40, 40), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)] * 10]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(buffer.getvalue(), "anim.gif")
    assert image.mode == "RGB" and image.getpixel((20, 20)) == (255, 0, 0)


def test_animated_webp_gives_the_first_frame():
    frames = [Image.new("RGB", (40, 40), color) for color in [(0, 0, 255), (255, 255, 0)] * 5]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    red, green, blue = load_image(buffer.getvalue(), "anim.webp").getpixel((20, 20))
    assert blue > 200 and red < 50 and green < 50


def test_cmyk_jpeg_becomes_rgb():
    image = load_image(image_bytes("JPEG", mode="CMYK", color=(200, 30, 30), quality=95), "cmyk.jpg")
    red, green, blue = image.getpixel((5, 5))
    assert image.mode == "RGB" and red > 150 and green < 90 and blue < 90


def test_16_bit_png_is_scaled_not_clipped():
    image16 = Image.new("I;16", (32, 32), 32768)  # half of 65535: mid grey, not white
    buffer = io.BytesIO()
    image16.save(buffer, "PNG")
    image = load_image(buffer.getvalue(), "deep.png")
    assert image.mode == "RGB"
    assert all(120 <= value <= 135 for value in image.getpixel((3, 3)))


def test_palette_png_with_transparency_is_flattened_on_white():
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (10, 0, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    result = load_image(buffer.getvalue(), "palette.png")
    assert result.getpixel((2, 2)) == (255, 255, 255) and result.getpixel((15, 5)) == (255, 0, 0)


def test_rgba_png_is_flattened_on_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    assert load_image(buffer.getvalue(), "clear.png").getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "RGBA", "I;16"])
def test_every_png_mode_becomes_rgb(mode):
    image = Image.new("RGB", (16, 16), (120, 120, 120)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.new("I;16", (16, 16), 120 * 257)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    result = load_image(buffer.getvalue(), f"{mode}.png")
    assert result.mode == "RGB"
    if mode not in ("1", "P"):  # 1-bit and web-palette conversions approximate the grey
        assert all(abs(value - 120) <= 2 for value in result.getpixel((8, 8)))


@pytest.mark.parametrize("mode", ["I", "F", "CMYK", "YCbCr", "HSV", "RGBa"])
def test_modes_only_other_formats_carry_become_rgb(mode):
    """32-bit integer and float images come from formats we refuse, but the conversion must still hold."""
    assert inputs._to_rgb(Image.new(mode, (8, 8))).mode == "RGB"


def test_exif_orientation_is_applied():
    # Stored 60x40 (landscape) with orientation 6 "rotate 90 CW": shown upright it is 40x60 (portrait).
    stored = Image.new("RGB", (60, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 60, 20))  # top half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif, quality=95)
    upright = load_image(buffer.getvalue(), "phone.jpg")
    assert upright.size == (40, 60)
    # The stored top (blue) ends up on the right after a 90 degree clockwise turn.
    assert upright.getpixel((35, 30))[2] > 200 and upright.getpixel((5, 30))[0] > 200


def test_large_jpeg_is_decoded_at_reduced_scale():
    data = image_bytes("JPEG", size=(4000, 3000))
    image = load_image(data, "big.jpg")
    assert image.size == (500, 375)  # decoded at 1/8 scale, not 4000x3000 then shrunk


def test_read_image_input_names_files_by_content_hash_and_format():
    data = image_bytes("JPEG")
    item = read_image_input(data, "../../etc/passwd<script>.png")
    assert item.extension == "jpg" and len(item.content_hash) == 64
    assert item.source == "../../etc/passwd<script>.png"


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_give_an_image_or_invalid_image_error(data):
    try:
        image = load_image(data, "fuzz.bin")
    except InvalidImageError as error:
        assert "fuzz.bin" in str(error)
    else:
        assert image.mode == "RGB"


@settings(max_examples=150, deadline=2000)
@given(st.binary(min_size=1, max_size=512), st.integers(min_value=0, max_value=400))
def test_corrupted_real_images_give_an_image_or_invalid_image_error(noise, offset):
    base = bytearray(image_bytes("PNG", size=(40, 30)) if offset % 2 else image_bytes("JPEG", size=(40, 30)))
    base[offset % len(base):offset % len(base) + len(noise)] = noise
    try:
        assert load_image(bytes(base), "mutated").mode == "RGB"
    except InvalidImageError:
        pass


def test_a_big_png_with_transparency_is_reduced_flattened_and_upright():
    """Above LARGE_DECODE_PIXELS the picture is box-reduced in bands before anything else: same result."""
    big = Image.new("RGBA", (4800, 3600), (0, 0, 255, 0))          # 17 MP, transparent blue...
    big.paste((255, 0, 0, 255), (0, 0, 2400, 3600))               # ...with an opaque red left half
    buffer = io.BytesIO()
    big.save(buffer, "PNG", compress_level=1)
    image = load_image(buffer.getvalue(), "big.png")
    assert image.size == (512, 384) and image.mode == "RGB"
    assert image.getpixel((100, 200)) == (255, 0, 0) and image.getpixel((400, 200)) == (255, 255, 255)
