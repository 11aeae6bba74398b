"""load_image and read_image_input: every kind of bad file is refused by name, every good one becomes upright RGB."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import inputs
from conftest import image_bytes
from inputs import InvalidImageError, load_image, read_image_input


def png_file(header: bytes, pixel_data: bytes) -> bytes:
    """A PNG written by hand, for what Pillow will not write: a lying header, 16 bits with alpha."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixel_data))
            + chunk(b"IEND", b""))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny but valid-looking PNG whose header claims a huge size (a decompression bomb)."""
    return png_file(struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0), b"\x00" * 64)


def png_16_bit_with_alpha(pixels: np.ndarray) -> bytes:
    """A 16-bit grey+alpha (last axis 2) or RGBA (last axis 4) PNG; Pillow reads these but cannot write them."""
    height, width, channels = pixels.shape
    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 4: 6}[channels], 0, 0, 0)
    return png_file(header, b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels))


def mpo_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A multi-picture JPEG (MPO, as phones and 3D cameras write): image_bytes' picture first, then a blue one."""
    return image_bytes("MPO", size=size, save_all=True, append_images=[Image.new("RGB", size, (0, 0, 255))])


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


@pytest.mark.parametrize("value", [0, 200, 255, 256, 32768, 65535])
def test_16_bit_png_keeps_its_brightness(value):
    """0..65535 maps onto 0..255 whatever the values: a dark 16-bit picture stays dark, a bright one bright."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), value, np.uint16)).save(buffer, "PNG")
    image = load_image(buffer.getvalue(), "deep.png")
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (value >> 8,) * 3


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
@pytest.mark.parametrize("value", [200, 40000])
def test_every_16_and_32_bit_mode_is_read_as_0_to_65535(mode, value):
    assert inputs._to_rgb(Image.new(mode, (4, 4), value)).getpixel((1, 1)) == (value >> 8,) * 3


TRANSPARENT_CASES = ["RGBA", "LA", "P", "PA", "GIF", "WEBP", "RGB+tRNS", "L+tRNS", "I;16+tRNS", "LA 16-bit",
                     "RGBA 16-bit"]


def half_transparent(case: str) -> tuple[bytes | Image.Image, tuple[int, int, int]]:
    """20x20 in one of TRANSPARENT_CASES: the left half fully transparent over black, the right half opaque.
    Returns the file (or, for PA, which no accepted format writes, the image) and the opaque half's colour."""
    shown = (200, 30, 30)
    buffer = io.BytesIO()
    if case in ("RGBA", "LA", "WEBP"):
        image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
        image.paste((*shown, 255), (10, 0, 20, 20))
        if case == "LA":
            image, shown = image.convert("LA"), (81, 81, 81)
        image.save(buffer, "WEBP" if case == "WEBP" else "PNG", lossless=True)
    elif case in ("P", "PA", "GIF"):
        image = Image.new("P", (20, 20), 0)
        image.putpalette([0, 0, 0, *shown])
        image.paste(1, (10, 0, 20, 20))
        if case == "PA":
            image = image.convert("PA")
            image.putalpha(0)
            image.paste((1, 255), (10, 0, 20, 20))
            return image, shown
        image.save(buffer, "GIF" if case == "GIF" else "PNG", transparency=0)
    elif case in ("RGB+tRNS", "L+tRNS"):
        image = Image.new("RGB", (20, 20), (0, 0, 0))
        image.paste(shown, (10, 0, 20, 20))
        if case == "L+tRNS":
            image, shown = image.convert("L"), (81, 81, 81)
        image.save(buffer, "PNG", transparency=(0, 0, 0) if image.mode == "RGB" else 0)
    elif case == "I;16+tRNS":
        values = np.zeros((20, 20), np.uint16)
        values[:, 10:] = 40000
        Image.fromarray(values).save(buffer, "PNG", transparency=0)
        shown = (40000 >> 8,) * 3
    else:
        channels = 2 if case == "LA 16-bit" else 4
        pixels = np.zeros((20, 20, channels), np.uint16)
        pixels[:, 10:] = [40000] * (channels - 1) + [65535]
        return png_16_bit_with_alpha(pixels), (40000 >> 8,) * 3
    return buffer.getvalue(), shown


@pytest.mark.parametrize("case", TRANSPARENT_CASES)
def test_transparency_is_flattened_onto_the_same_background_in_every_mode(case):
    picture, shown = half_transparent(case)
    image = inputs._to_rgb(picture) if isinstance(picture, Image.Image) else load_image(picture, f"{case}.png")
    assert image.getpixel((3, 10)) == inputs.BACKGROUND
    assert all(abs(got - want) <= 2 for got, want in zip(image.getpixel((16, 10)), shown))


def test_a_transparent_colour_never_bleeds_in_when_shrunk():
    """A PNG whose transparency is one colour (tRNS): shrinking must not mix that hidden colour into its neighbours."""
    image = Image.new("RGB", (1024, 1024), (255, 0, 0))      # red is the transparent colour...
    for x in range(1, 1024, 2):
        image.paste((0, 0, 255), (x, 0, x + 1, 1024))         # ...every other column opaque blue
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=(255, 0, 0))
    red, green, blue = load_image(buffer.getvalue(), "striped.png").getpixel((200, 200))
    assert abs(red - green) <= 8 and blue > 240  # half blue on white, never purple


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


SMALL, BIG = (60, 40), (4800, 3600)  # BIG: 17 MP, above inputs.LARGE_DECODE_PIXELS


@pytest.mark.parametrize("image_format, mode, size", [
    ("JPEG", "RGB", SMALL), ("PNG", "RGB", SMALL), ("WEBP", "RGB", SMALL),   # decoded whole
    ("JPEG", "RGB", BIG), ("MPO", "RGB", BIG),                               # decoded at 1/8 scale
    ("PNG", "RGB", BIG), ("WEBP", "RGB", BIG), ("PNG", "I;16", BIG),         # reduced in bands
])
def test_exif_orientation_is_applied_on_every_decode_path(image_format, mode, size):
    """Stored landscape with orientation 6 ("rotate 90 CW"): upright it is portrait, the stored top on the right."""
    width, height = size
    if mode == "RGB":
        stored = Image.new("RGB", size, (255, 0, 0))
        stored.paste((0, 0, 255), (0, 0, width, height // 2))  # top half blue as stored
        top, bottom = (0, 0, 255), (255, 0, 0)
    else:
        values = np.zeros((height, width), np.uint16)
        values[: height // 2] = 65535                           # top half white as stored
        stored, top, bottom = Image.fromarray(values), (255, 255, 255), (0, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    extra = {"save_all": True, "append_images": [stored]} if image_format == "MPO" else {}
    stored.save(buffer, image_format, exif=exif, quality=90, compress_level=1, **extra)
    upright = load_image(buffer.getvalue(), f"phone.{image_format.lower()}")
    assert upright.size == ((40, 60) if size == SMALL else (384, 512))
    middle = upright.height // 2
    right, left = upright.getpixel((upright.width - 5, middle)), upright.getpixel((4, middle))
    assert all(abs(got - want) <= 40 for got, want in zip(right + left, top + bottom))


def test_large_jpeg_is_decoded_at_reduced_scale():
    data = image_bytes("JPEG", size=(4000, 3000))
    image = load_image(data, "big.jpg")
    assert image.size == (500, 375)  # decoded at 1/8 scale, not 4000x3000 then shrunk


def test_large_multi_picture_jpeg_is_decoded_at_reduced_scale_like_a_jpeg():
    assert load_image(mpo_bytes(size=(4000, 3000)), "big.mpo").size == (500, 375)


def test_multi_picture_jpeg_is_stored_as_jpg_and_gives_its_first_picture():
    data = mpo_bytes()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    item = read_image_input(data, "phone.jpg")
    assert item.extension == "jpg"
    red, green, blue = item.image.getpixel((5, 5))  # image_bytes' left half (200, 30, 30), not the blue second picture
    assert red > 180 and green < 60 and blue < 60


def test_read_image_input_names_files_by_content_hash_and_format():
    data = image_bytes("JPEG")
    item = read_image_input(data, "../../etc/passwd<script>.png")
    assert item.extension == "jpg" and item.content_hash == hashlib.sha256(data).hexdigest()  # of the bytes kept
    assert item.source == "../../etc/passwd<script>.png" and item.data == data


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


# ---------------------------------------------------------------- ZIPs whose headers say anything

def version_6_4_zip() -> bytes:
    """Issue 27.2's 214-byte ZIP: one picture, whose headers say it needs ZIP version 6.4 to be extracted. zipfile
    refuses to open it with NotImplementedError, which the page showed as a traceback."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photos/cat-4.png", image_bytes("PNG", size=(4, 4)))
    data = needing_version_6_4(buffer.getvalue())
    assert len(data) == 214
    return data


def needing_version_6_4(archive: bytes) -> bytes:
    """This ZIP, its first member's headers saying it needs ZIP version 6.4 (zipfile reads up to 6.3)."""
    places = header_places(archive)
    data = with_field(archive, "local", places["local"][0], "version needed", 64)
    return with_field(data, "central", places["central"][0], "version needed", 64)


def with_a_nameless_member(archive: bytes) -> bytes:
    """This ZIP, its first member's name starting with a NUL byte in both its headers: zipfile cuts a name at its
    first NUL, so that one has none."""
    places = header_places(archive)
    data = bytearray(archive)
    data[places["local"][0] + 30] = data[places["central"][0] + 46] = 0  # the first byte of each copy of the name
    return bytes(data)


# (offset, struct format) of each field a broken or hostile tool can set to anything, in each kind of ZIP record.
ZIP_FIELDS = {
    "local": {"version needed": (4, "<H"), "flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"),
              "compressed size": (18, "<I"), "size": (22, "<I"), "name length": (26, "<H"),
              "extra length": (28, "<H")},
    "central": {"version made by": (4, "<H"), "version needed": (6, "<H"), "flags": (8, "<H"), "method": (10, "<H"),
                "crc": (16, "<I"), "compressed size": (20, "<I"), "size": (24, "<I"), "name length": (28, "<H"),
                "extra length": (30, "<H"), "comment length": (32, "<H"), "disk": (34, "<H"),
                "external attributes": (38, "<I"), "local header offset": (42, "<I")},
    "end": {"disk": (4, "<H"), "directory's disk": (6, "<H"), "entries on this disk": (8, "<H"), "entries": (10, "<H"),
            "directory size": (12, "<I"), "directory offset": (16, "<I"), "comment length": (20, "<H")},
}
# Values that mean something in those fields: versions (2.0, 4.5, 6.3, 6.4), flag bits (encrypted, sizes after the
# data, patched data, strong encryption, UTF-8 names, a masked directory), methods (stored, deflate, bzip2, LZMA,
# Deflate64, Zstandard, XZ, AES), ZIP64's "look in the extra field".
ZIP_VALUES = (0, 1, 2, 0x8, 0xC, 0xE, 9, 20, 45, 63, 64, 93, 95, 99, 0x20, 0x40, 0x800, 0x2000, 0xFFFF, 0xFFFFFFFF)


def header_places(archive: bytes) -> dict[str, list[int]]:
    """Where each local header, central directory entry and the end record of a (valid) ZIP start."""
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        local = [info.header_offset for info in opened.infolist()]
        at = opened.start_dir
    central = []
    while archive[at:at + 4] == b"PK\x01\x02":
        central.append(at)
        at += 46 + sum(struct.unpack_from("<HHH", archive, at + 28))
    return {"local": local, "central": central, "end": [archive.rindex(b"PK\x05\x06")]}


def with_field(archive: bytes, record: str, start: int, field: str, value: int) -> bytes:
    """This ZIP with one field of the record at `start` set to `value` (clipped to what the field holds)."""
    offset, layout = ZIP_FIELDS[record][field]
    data = bytearray(archive)
    struct.pack_into(layout, data, start + offset, min(max(value, 0), 2 ** (8 * struct.calcsize(layout)) - 1))
    return bytes(data)


@st.composite
def mutated_zips(draw, archive: bytes) -> bytes:
    """This ZIP with one to four of its header fields set to another value: a meaningful one, a neighbour of the
    old one, or any."""
    places = header_places(archive)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        record = draw(st.sampled_from(sorted(ZIP_FIELDS)))
        start = draw(st.sampled_from(places[record]))
        field = draw(st.sampled_from(sorted(ZIP_FIELDS[record])))
        offset, layout = ZIP_FIELDS[record][field]
        old = struct.unpack_from(layout, archive, start + offset)[0]
        archive = with_field(archive, record, start, field, draw(st.one_of(
            st.sampled_from(ZIP_VALUES), st.sampled_from((old - 1, old + 1)),
            st.integers(min_value=0, max_value=2 ** (8 * struct.calcsize(layout)) - 1))))
    return archive


def test_a_zip_zipfile_will_not_open_is_refused_by_name():
    [(shown, data, error)] = inputs.zip_images(io.BytesIO(version_6_4_zip()), "v64.zip")
    assert (shown, data) == ("v64.zip", None)
    assert error == "'v64.zip' is not a readable ZIP archive (zip file version 6.4)."


def three_pictures_zip() -> tuple[bytearray, dict[str, list[int]]]:
    """A ZIP of three small pictures, stored, and where its headers are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(3):
            archive.writestr(f"{index}.png", image_bytes("PNG", size=(8, 8), color=(index * 80, 0, 0)))
    return bytearray(buffer.getvalue()), header_places(buffer.getvalue())


def read_zip(data: bytes) -> list[tuple[str, str | None]]:
    return [(shown, error) for shown, _, error in inputs.zip_images(io.BytesIO(bytes(data)), "three.zip")]


def test_a_member_whose_name_is_cut_to_nothing_is_named_and_the_others_are_read():
    """Python 3.11's ZipInfo.is_dir() raises IndexError on an empty name: one nameless entry lost every picture of
    the ZIP (and `python db.py import` said only "IndexError")."""
    data, _ = three_pictures_zip()
    assert read_zip(with_a_nameless_member(bytes(data))) == [
        ("three.zip/", "'three.zip': member '' has no name; it was left out."),
        ("three.zip/1.png", None), ("three.zip/2.png", None)]


def test_entries_a_damaged_directory_size_hides_are_said_to_be_lost():
    """zipfile reads the directory by the size the end record gives: one that covers only the last entry would
    lose the other two without a word."""
    data, places = three_pictures_zip()
    last_entry = places["end"][0] - places["central"][-1]  # the directory's size and start: the last entry's
    struct.pack_into("<II", data, places["end"][0] + 12, last_entry, places["central"][-1])
    assert read_zip(data) == [
        ("three.zip", "'three.zip' claims 3 entries, but its directory lists 1: the headers of the other 2 are "
                      "damaged, and they were left out."),
        ("three.zip/2.png", None)]


def test_a_member_the_archive_ends_inside_and_a_long_damaged_header_are_said_in_words():
    """zipfile raises a bare EOFError for the one, and quotes a whole damaged header for the other."""
    data, places = three_pictures_zip()
    struct.pack_into("<II", data, places["central"][2] + 20, 10_000, 10_000)  # the last member's sizes
    struct.pack_into("<H", data, places["local"][1] + 26, 5000)         # the second's name length, in its header
    first, (second, why), third = read_zip(data)
    assert first == ("three.zip/0.png", None) and second == "three.zip/1.png"
    assert why.startswith("'three.zip': member '1.png' cannot be read (File name in directory '1.png' and header b")
    assert why.endswith("...); it was left out.") and len(why) < 300
    assert third == ("three.zip/2.png", "'three.zip': member '2.png' cannot be read (the archive ends inside it); "
                                        "it was left out.")
