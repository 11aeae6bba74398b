"""Where untrusted input enters: uploaded bytes become RGB images, URLs become bytes, or a clear error."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import lzma
import os
import re
import struct
import threading
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import BinaryIO, Iterator
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps

# Formats are matched on content, never on the file name.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
ALLOWED_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "mpo")  # .mpo: multi-picture JPEGs from cameras
# A multi-picture JPEG (MPO, which many phones and cameras write) is a JPEG with more pictures after the first;
# Pillow opens it as format "MPO". It is decoded, reduced and stored (.jpg) like any JPEG; the first picture is used.
JPEG_FORMATS = ("JPEG", "MPO")
MAX_FILE_BYTES = 20 * 1024 * 1024
# A ZIP of such images (ImageFolder or flat) is read member by member, each member held to MAX_FILE_BYTES; the ZIP
# itself may be far bigger (a thousand phone photos). Streamlit's upload limit (.streamlit/config.toml) is this one.
ZIP_EXTENSIONS = ("zip",)
MAX_ZIP_BYTES = 2048 * 1024 * 1024
MAX_ZIP_MEMBERS = 10_000
# Entries a ZIP may list, folders and hidden files included (macOS adds a `__MACOSX/._` copy of each file): zipfile
# builds an object for each entry when it opens an archive, before any limit of ours can apply.
MAX_ZIP_ENTRIES = 3 * MAX_ZIP_MEMBERS
CENTRAL_HEADER_BYTES = 46  # the fixed part of an entry of a ZIP's central directory
SIGNATURE_BYTES = 512  # a member's first bytes, enough to tell an image (or what else it is) before reading on
# What zipfile can inflate, and the names of other methods met in the wild, for the error that refuses them. A
# member that inflates more than this ratio (past 1 MB) is a bomb, not a photo, and so is an upload whose members
# together do (many small members of nothing). Uploads and `python db.py import` check members the same way.
READABLE_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
COMPRESSION_NAMES = {6: "Implode", 9: "Deflate64", 93: "Zstandard", 95: "XZ", 98: "PPMd"}
MAX_COMPRESSION_RATIO = 100
# What opening a damaged archive, or reading and inflating a damaged member, raises (zipfile, zlib, bz2 and lzma
# each have their own; NotImplementedError for a ZIP version or method zipfile does not know), so that the error
# names the archive or member: a traceback or a bare "LZMAError: Corrupt input data" names none.
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError, EOFError, OSError, ValueError)
# What the page says of an input that failed in a way no check here foresaw, after its name: the traceback (whose
# frames name the server's files) goes to the server's log, never to a browser, and the other inputs go on.
UNFORESEEN = "an unforeseen error; the server's log has the details"
LOG = logging.getLogger(__name__)
# 64 megapixels: bigger than any phone photo, far below what would exhaust memory.
MAX_PIXELS = 64_000_000
# Decoded images are kept at most this big: all the page shows, and far more than the model's 32x32.
DISPLAY_SIZE = (512, 512)
# Large JPEGs are decoded straight at 1/2, 1/4 or 1/8 scale, never below this, instead of in full.
DRAFT_SIZE = (256, 256)
# Other formats decode in full; above this size they decode one at a time, reduced in bands (see _decode).
LARGE_DECODE_PIXELS = 16_000_000
_LARGE_DECODE = threading.Lock()
# Modes Pillow resizes correctly as they are (alpha premultiplied), so a big picture can shrink before conversion.
SHRINK_FIRST_MODES = ("RGB", "RGBA", "L", "LA")
# What every transparent pixel becomes, whatever the mode that carried its transparency.
BACKGROUND = (255, 255, 255)

# Pillow releases the GIL while decoding, so a batch decodes on every core.
DECODE_THREADS = max(2, os.cpu_count() or 1)

URL_CONNECT_TIMEOUT = 5.0
URL_TOTAL_TIMEOUT = 20.0
URL_MAX_REDIRECTS = 5
ALLOW_PRIVATE_URLS_ENV = "CIFAR10_ALLOW_PRIVATE_URLS"
_FETCHERS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fetch")

# Signatures of common files that are not accepted images, to say what a rejected file really is.
_KNOWN_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"%!PS", "a PostScript/EPS file"),
    (b"\xc5\xd0\xd3\xc6", "an EPS file"),
    (b"8BPS", "a Photoshop (PSD) file"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x00\x00\x01\x00", "an icon (ICO) file"),
)


_WARNINGS_LOCK = threading.Lock()


class InvalidImageError(ValueError):
    """The bytes are not an acceptable image; the message names the file and the problem."""


class FetchError(ValueError):
    """A URL could not be fetched as an image; the message names the URL and the problem."""


def unforeseen(error: Exception, what: str) -> str:
    """Log the traceback of an error no check foresaw while reading `what` (an upload's name, a member, a URL);
    returns what the page may say of it."""
    LOG.error("reading %r failed", what, exc_info=error)
    return f"{UNFORESEEN} ({type(error).__name__})"


def _accepted_format_by_signature(data: bytes) -> str | None:
    """Which accepted format the first bytes announce, so a damaged one is called that, not 'not an image'."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _describe_content(data: bytes) -> str | None:
    for signature, description in _KNOWN_SIGNATURES:
        if data.startswith(signature):
            return description
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.strip() and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "a text file"
    return None


def _to_8_bit_with_alpha(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey read as 0..65535 and scaled to 0..255 (never clipped: a dark picture stays dark), and a
    transparent colour (a PNG's tRNS) made an alpha channel: before anything resamples, which would blend it in."""
    key = image.info.get("transparency")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image)
        grey = Image.fromarray((np.clip(values, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8))
        if key is not None:
            grey.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
        grey.info = {name: value for name, value in image.info.items() if name != "transparency"}  # EXIF kept
        return grey
    if key is not None and image.mode in ("1", "L", "RGB"):
        return image.convert("RGBA" if image.mode == "RGB" else "LA")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, every kind of transparency flattened onto BACKGROUND."""
    image = _to_8_bit_with_alpha(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass(frozen=True)
class ImageInput:
    """One accepted image: the original bytes (what gets stored), the decoded picture and its identity."""

    source: str
    data: bytes
    image: Image.Image
    content_hash: str
    extension: str


def load_image(data: bytes, name: str = "") -> Image.Image:
    """Decode untrusted bytes into an upright RGB image (at most DISPLAY_SIZE), or raise InvalidImageError saying why."""
    return _decode(data, name)[0]


def content_hash(data: bytes) -> str:
    """A picture's identity: the SHA-256 of its bytes, whatever the name or URL it came by."""
    return hashlib.sha256(data).hexdigest()


def read_image_input(data: bytes, source: str, digest: str | None = None) -> ImageInput:
    """Decode and fingerprint an upload or download; the hash, not the user's name, identifies it on disk. `digest`:
    its content_hash, where the caller has it already (the page hashes each input as it keeps it)."""
    image, image_format = _decode(data, source)
    return ImageInput(
        source=source,
        data=data,
        image=image,
        content_hash=digest or content_hash(data),
        extension="jpg" if image_format in JPEG_FORMATS else image_format.lower(),
    )


def not_an_image(head: bytes, label: str) -> str:
    """What to say of a file whose first bytes announce no accepted format (what it is, where they tell)."""
    allowed = ", ".join(ALLOWED_FORMATS)
    what = _describe_content(head)
    if what is not None:
        return f"{label} is {what}, not an accepted image ({allowed})."
    return f"{label} is not an image in an accepted format ({allowed})."


def _decode(data: bytes, name: str) -> tuple[Image.Image, str]:
    label = f"'{name}'" if name else "The file"
    if not data:
        raise InvalidImageError(f"{label} is empty (0 bytes).")
    if len(data) > MAX_FILE_BYTES:
        raise InvalidImageError(
            f"{label} is {len(data) / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB.")
    try:
        # catch_warnings changes process-wide state: the lock keeps decoding threads from undoing each other's.
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImageError(
            f"{label} declares too many pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels ({error}).") from error
    except Exception as error:
        claimed = _accepted_format_by_signature(data)
        if claimed is not None:
            raise InvalidImageError(f"{label} starts like a {claimed} file but its header is damaged ({error}).") \
                from error
        raise InvalidImageError(not_an_image(data, label)) from error
    width, height = image.size
    if width * height > MAX_PIXELS or width < 1 or height < 1:
        raise InvalidImageError(
            f"{label} declares {width}x{height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels.")
    # Only JPEG decodes at reduced scale; any other big picture decodes whole (up to 256 MB at 64 MP), so those
    # take turns: whatever the batch and the threads, one full-size decode is in memory at a time.
    image_format = image.format  # the working copies made below have none
    jpeg = image_format in JPEG_FORMATS
    whole = not jpeg and width * height > LARGE_DECODE_PIXELS
    try:
        with _LARGE_DECODE if whole else contextlib.nullcontext():
            if jpeg:
                image.draft(image.mode, DRAFT_SIZE)
            image.seek(0)
            image.load()
            image = _to_8_bit_with_alpha(image)
            if whole and image.mode in SHRINK_FIRST_MODES:
                image = _reduce_in_bands(image, int(max(width / DISPLAY_SIZE[0], height / DISPLAY_SIZE[1]) / 1.5))
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
            if image.mode in SHRINK_FIRST_MODES:  # shrink before flattening: no full-size RGB or RGBA copy
                _shrink(image)
            image = _to_rgb(image)
            _shrink(image)
        return image, image_format
    except Exception as error:
        if isinstance(error, OSError) and "truncated" in str(error):
            raise InvalidImageError(f"{label} is truncated: the {image_format} data ends early.") from error
        raise InvalidImageError(f"{label} is a damaged {image_format} file that cannot be decoded ({error}).") from error


def _reduce_in_bands(image: Image.Image, factor: int) -> Image.Image:
    """image.reduce(factor), a band of rows at a time: on RGBA, Pillow's own resize and reduce first make a
    premultiplied copy of the whole picture (another 256 MB at 64 MP); a band's copy is a few MB."""
    if factor < 2:
        return image
    width, height = image.size
    rows = factor * max(1, (8 << 20) // (width * 4 * factor))
    reduced = Image.new(image.mode, (-(-width // factor), -(-height // factor)))
    reduced.info = image.info  # the EXIF orientation, applied after
    for top in range(0, height, rows):
        reduced.paste(image.crop((0, top, width, min(height, top + rows))).reduce(factor), (0, top // factor))
    return reduced


def _shrink(image: Image.Image) -> None:
    """A box reduce by whole factors down to 1.5x the display size, then Lanczos: half the time of Lanczos
    alone on a 1600x1200 PNG, with no visible difference at display size."""
    image.thumbnail(DISPLAY_SIZE, Image.Resampling.LANCZOS, reducing_gap=1.5)


def is_zip(name: str) -> bool:
    return name.lower().endswith(tuple(f".{extension}" for extension in ZIP_EXTENSIONS))


def upload_problem(name: str, size: int) -> str:
    """Why an uploaded file is refused before it is read, or '': bigger than one image may be, or, for a ZIP, than a
    ZIP may be. Streamlit applies only the ZIP's limit (one limit for every file)."""
    if is_zip(name):
        if size > MAX_ZIP_BYTES:
            return f"'{name}' is {size / 2**20:,.0f} MB; a ZIP may be at most {MAX_ZIP_BYTES // 2**20:,} MB."
    elif size > MAX_FILE_BYTES:
        return (f"'{name}' is {size / 2**20:.1f} MB; one image may be at most {MAX_FILE_BYTES // 2**20} MB (a ZIP of "
                f"images up to {MAX_ZIP_BYTES // 2**20:,} MB).")
    return ""


def zip_images(archive_file: BinaryIO, name: str) -> Iterator[tuple[str, bytes | None, str | None]]:
    """The files of an uploaded ZIP, one at a time (memory holds one member): (name shown, bytes, None) for each
    member to read as an image, named `archive.zip/folder/file.jpg`; (name shown, None, why) for each member that
    is left out (an unsafe path, encrypted, unreadable, too big), and for entries the archive claims but whose
    headers cannot be found; the rest go on. Whatever its headers say, no exception comes out: an archive that
    cannot be opened is one (name, None, why). Folders are read through (ImageFolder or flat); hidden files
    (`.DS_Store`, the `._` copies macOS adds under `__MACOSX/`) are archive clutter, passed over. Whether a member
    is an image its first bytes say, before the rest is inflated; the decoder then checks it whole, as any upload."""
    size = archive_file.seek(0, io.SEEK_END)
    try:
        if zip_entry_count(archive_file, MAX_ZIP_ENTRIES) > MAX_ZIP_ENTRIES:
            yield name, None, (f"'{name}' lists more than {MAX_ZIP_ENTRIES:,} entries, the most a ZIP may list (files, "
                               "folders and the hidden files of macOS).")
            return
        archive = zipfile.ZipFile(archive_file)
        lost = zip_lost_entries(archive)
    except MEMBER_ERRORS as error:
        yield name, None, f"'{name}' is not a readable ZIP archive ({zip_error_text(error)})."
        return
    except Exception as error:  # noqa: BLE001 (no archive may stop the other uploads or reach the page)
        yield name, None, f"'{name}' could not be read as a ZIP archive: {unforeseen(error, name)}."
        return
    with archive:
        if lost:
            yield name, None, f"'{name}' {lost}, and they were left out."
        # A folder's name ends in "/" (ZipInfo.is_dir() says so too, but raises IndexError on an empty name).
        members = [info for info in archive.infolist()
                   if not info.filename.endswith("/") and not info.filename.rsplit("/", 1)[-1].startswith(".")]
        if len(members) > MAX_ZIP_MEMBERS:
            yield name, None, (f"'{name}' holds {len(members):,} files; the first {MAX_ZIP_MEMBERS:,} were read, "
                               "the rest left out.")
        inflated = 0  # what all members read so far come to: at most MAX_COMPRESSION_RATIO times the archive
        for info in members[:MAX_ZIP_MEMBERS]:
            shown = f"{name}/{info.filename}"
            inflated += info.file_size
            if inflated > MAX_COMPRESSION_RATIO * size:
                yield shown, None, (f"'{name}' inflates to more than {MAX_COMPRESSION_RATIO} times its size: "
                                    f"member {info.filename!r} and the ones after it were left out.")
                return
            problem = zip_member_problem(info, MAX_FILE_BYTES)
            if problem:
                yield shown, None, f"'{name}': member {info.filename!r} {problem}; it was left out."
                continue
            try:
                with archive.open(info) as member:
                    head = member.read(SIGNATURE_BYTES)  # what it is, before the rest is inflated and kept
                    if _accepted_format_by_signature(head) is None:
                        yield shown, None, not_an_image(head, f"'{shown}'")
                        continue
                    yield shown, head + member.read(MAX_FILE_BYTES + 1 - len(head)), None
            except MEMBER_ERRORS as error:
                yield shown, None, (f"'{name}': member {info.filename!r} cannot be read ({zip_error_text(error)}); "
                                    "it was left out.")
            except Exception as error:  # noqa: BLE001 (one member may not stop the others)
                yield shown, None, (f"'{name}': member {info.filename!r} cannot be read "
                                    f"({unforeseen(error, shown)}); it was left out.")


def zip_error_text(error: Exception) -> str:
    """What an error reading a ZIP says, fit for a message: zipfile raises a bare EOFError where the archive ends
    inside a member, and quotes a whole damaged header (up to 64 KB of its bytes) where two names differ."""
    if isinstance(error, EOFError) and not str(error):
        return "the archive ends inside it"
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _end_record(archive_file: BinaryIO) -> list:
    """A ZIP's end record, as zipfile reads it (ZIP64's included), or BadZipFile where there is none."""
    end = zipfile._EndRecData(archive_file)  # noqa: SLF001 (the standard library's reader of that record)
    if end is None:
        raise zipfile.BadZipFile("File is not a zip file")
    return end


def zip_entry_count(archive_file: BinaryIO, limit: int) -> int:
    """How many entries a ZIP's central directory holds, counted header by header up to `limit` + 1: zipfile reads
    the whole directory, by the size the archive's end record gives (ZIP64 too), and builds an object for each
    entry, whatever count that record claims. Raises BadZipFile where there is no end record."""
    end = _end_record(archive_file)
    size = end[zipfile._ECD_SIZE]  # noqa: SLF001
    start = end[zipfile._ECD_LOCATION] - size  # noqa: SLF001 (where zipfile reads it, after any prepended data)
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # noqa: SLF001
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    count, at = 0, 0
    while count <= limit and at + CENTRAL_HEADER_BYTES <= size:
        archive_file.seek(start + at)
        header = archive_file.read(CENTRAL_HEADER_BYTES)
        if len(header) < CENTRAL_HEADER_BYTES or not header.startswith(zipfile.stringCentralDir):
            break  # zipfile stops here too, with an error of its own
        name, extra, comment = struct.unpack("<HHH", header[28:34])
        at += CENTRAL_HEADER_BYTES + name + extra + comment
        count += 1
    return count


def zip_lost_entries(archive: zipfile.ZipFile) -> str:
    """What an opened ZIP lost, said after its name, or '': zipfile reads the directory by the size the end record
    gives and never checks the count that record claims, so entries a damaged size or header hides would vanish
    without a word. (A count below what is listed loses nothing: the directory is read whole.)"""
    claimed, listed = _end_record(archive.fp)[zipfile._ECD_ENTRIES_TOTAL], len(archive.infolist())  # noqa: SLF001
    if claimed <= listed:
        return ""
    return (f"claims {claimed:,} entries, but its directory lists {listed:,}: the headers of the other "
            f"{claimed - listed:,} are damaged")


def zip_member_problem(info: zipfile.ZipInfo, limit: int) -> str:
    """Why a ZIP member must not be read, or '': no name, an unsafe path, encryption, a method zipfile cannot
    inflate, more than `limit` bytes, or a bomb. Said after the member's name, as in "member 'x.png' is encrypted;
    ..."."""
    path = info.filename
    if not path:  # zipfile cuts a name at its first NUL byte: one that starts with it is empty
        return "has no name"
    if path.startswith(("/", "\\")) or "\\" in path or ".." in path.split("/") or re.match(r"^[A-Za-z]:", path):
        return "has an unsafe path (absolute, or with '..')"
    if info.flag_bits & 0x1:
        return "is encrypted; make the archive again without a password"
    if info.flag_bits & 0x20:  # general purpose bit 5, which zipfile cannot read
        return "is compressed patched data (ZIP flag bit 5), which cannot be read; make the archive again with Deflate"
    if info.compress_type not in READABLE_COMPRESSION:
        method = COMPRESSION_NAMES.get(info.compress_type, "an unknown method")
        return (f"is compressed with {method} (ZIP method {info.compress_type}), which cannot be read; make the "
                "archive again with Deflate")
    if info.file_size > limit or (
            info.file_size > 1 << 20 and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size)):
        return (f"inflates to {info.file_size / 2**20:.1f} MB from {info.compress_size / 2**20:.2f} MB: refused as a "
                "ZIP bomb or an oversized file")
    return ""


def private_url_policy() -> str:
    """'none' by default: a public server must never become a probe of its own network.

    CIFAR10_ALLOW_PRIVATE_URLS=1 allows every address (a local user fetching from their own network);
    CIFAR10_ALLOW_PRIVATE_URLS=loopback allows only this machine (127.0.0.0/8, ::1).
    """
    value = os.environ.get(ALLOW_PRIVATE_URLS_ENV, "").strip().lower()
    return {"1": "all", "loopback": "loopback"}.get(value, "none")


def _session(policy: str):
    """A requests session that checks every connection's address (each redirect hop) and connects to that same IP."""
    import requests
    from requests_hardened import Config, HTTPSession

    if policy == "all":
        session = requests.Session()
    else:
        session = HTTPSession(Config(
            ip_filter_enable=True,
            ip_filter_allow_loopback_ips=policy == "loopback",
            never_redirect=False,
            default_timeout=(URL_CONNECT_TIMEOUT, URL_CONNECT_TIMEOUT),
            user_agent_override="cifar10-classifier/1.0",
        ))
    session.max_redirects = URL_MAX_REDIRECTS
    session.trust_env = False
    return session


def fetch_image(url: str, max_bytes: int = MAX_FILE_BYTES, deadline_s: float = URL_TOTAL_TIMEOUT) -> bytes:
    """Download the body of an http(s) URL, or raise FetchError: at most max_bytes (counted as they arrive,
    whatever Content-Length says), and one deadline for everything (resolving, connecting, each redirect hop,
    the headers, the body). The caller decodes the bytes, once (read_image_input)."""
    url = _checked_url(url)
    deadline = time.monotonic() + deadline_s
    session = _session(private_url_policy())
    # The download runs in a worker so that even a name lookup, which takes no timeout, cannot outlast the
    # deadline; each hop's own timeouts are what is left of it, so the worker ends soon after as well.
    future = _FETCHERS.submit(_download, session, url, max_bytes, deadline, deadline_s)
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        raise _past_deadline(url, deadline_s) from None
    finally:
        session.close()


def _past_deadline(url: str, deadline_s: float) -> FetchError:
    return FetchError(f"{url!r} took longer than {deadline_s:.0f} s in all (connecting, redirects and download).")


def _checked_url(url: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as error:
        raise FetchError(f"{url!r} is not a valid URL ({error}).") from error
    if parts.scheme.lower() not in ("http", "https"):
        scheme = f"'{parts.scheme}:'" if parts.scheme else "no scheme"
        raise FetchError(f"{url!r} has {scheme}; only http:// and https:// URLs are accepted.")
    if not parts.hostname:
        raise FetchError(f"{url!r} is not a valid URL: it has no host name.")
    return url


def _download(session, url: str, max_bytes: int, deadline: float, deadline_s: float) -> bytes:
    """Follow at most URL_MAX_REDIRECTS redirects by hand, each hop checked and given only the time left."""
    import requests
    import urllib3
    from requests_hardened.ip_filter import InvalidIPAddress

    current = url
    try:
        for _ in range(URL_MAX_REDIRECTS + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise requests.Timeout("no time left")
            with session.get(current, stream=True, allow_redirects=False,
                             timeout=(min(URL_CONNECT_TIMEOUT, left), left)) as response:
                if response.is_redirect:
                    target = urljoin(current, response.headers["Location"])
                    if urlsplit(target).scheme.lower() not in ("http", "https"):
                        raise FetchError(f"{url!r} redirects to {target!r}, which is not an http:// or https:// URL.")
                    current = target
                    continue
                if response.status_code >= 400:
                    raise FetchError(f"{url!r} answered HTTP {response.status_code} {response.reason or ''}".rstrip()
                                     + ".")
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise FetchError(
                        f"{url!r} is {int(declared) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
                return _read_body(response, url, max_bytes, deadline, deadline_s)
        raise FetchError(f"{url!r} redirects more than {URL_MAX_REDIRECTS} times.")
    except FetchError:
        raise
    except InvalidIPAddress as error:
        raise FetchError(
            f"{url!r} points to a private or local address ({error}), which is refused. "
            f"Set {ALLOW_PRIVATE_URLS_ENV}=1 to allow it on your own machine.") from error
    except requests.Timeout as error:
        if time.monotonic() >= deadline - 0.05:  # the hop had only what was left of the deadline: that ran out
            raise _past_deadline(url, deadline_s) from error
        raise FetchError(f"{url!r} did not answer in time ({error.__class__.__name__}).") from error
    except requests.ConnectionError as error:
        raise FetchError(f"{url!r} could not be reached: {_reason(error)}.") from error
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as error:
        # urllib3's own errors come out of the body's raw reads too (a body that is not the gzip it says it is)
        raise FetchError(f"{url!r} could not be downloaded: {_reason(error)}.") from error


def _read_body(response, url: str, max_bytes: int, deadline: float, deadline_s: float) -> bytes:
    """The body, decompressed as it arrives (a small gzip can inflate past the cap), at most max_bytes, and
    no slow drip past the deadline."""
    chunks, received = [], 0
    while chunk := response.raw.read1(64 * 1024, decode_content=True):
        if time.monotonic() > deadline:  # the same message as a read that timed out at the deadline
            raise _past_deadline(url, deadline_s)
        received += len(chunk)
        if received > max_bytes:
            raise FetchError(f"{url!r} sent more than the {max_bytes / 2**20:.0f} MB limit.")
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(error: Exception) -> str:
    """The innermost cause of a requests error, which is the part a person can act on."""
    while error.__context__ is not None and not isinstance(error.__context__, (KeyError, AttributeError)):
        error = error.__context__
    text = str(error) or error.__class__.__name__
    return text if len(text) < 200 else text[:200] + "..."
