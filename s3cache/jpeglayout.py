"""A JPEG's frame layout, and whether TensorFlow's decode of it can be reproduced without TensorFlow.

:class:`JpegLayout` holds what the decision needs: the size, each component's ID and sampling
factors, and the JFIF and Adobe markers that say whether three components are YCbCr.
:func:`layout_of` takes it from an image Pillow opened. :func:`read_layout` reads it from the bytes
with no Pillow: the TensorFlow decoder asks this of every image, and Pillow's header parse (every
marker, EXIF included) costs about 30 us an image, several times more. It reads only headers made
of the usual markers in their usual form; for any other it answers ``None`` and the caller opens
the image with Pillow, so the two never disagree on an image both read (``tests/test_jpeglayout.py``
compares them on mutated headers).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

_SOI = b"\xff\xd8"
_SOS = 0xDA
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended and progressive Huffman frames
# Markers Pillow reads without looking inside (beyond their length), or only to keep their bytes.
_PLAIN_MARKERS = frozenset({0xC4, 0xDD, 0xFE, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xEB, 0xEC, 0xEF})
_APP0, _APP1, _APP2, _APP14, _DQT = 0xE0, 0xE1, 0xE2, 0xEE, 0xDB
_RGB_IDS = (82, 71, 66)  # components named 'R', 'G', 'B'


@dataclass(frozen=True)
class JpegLayout:
    """The frame of a JPEG as its header declares it.

    Attributes:
        width: Columns.
        height: Rows.
        components: ``(id, horizontal, vertical)`` sampling of each component, in frame order.
        jfif: Whether a JFIF marker is present (which means YCbCr).
        adobe: Whether an Adobe marker is present.
        adobe_transform: The Adobe marker's colour transform, or ``None`` where it has none.
    """

    width: int
    height: int
    components: tuple[tuple[int, int, int], ...]
    jfif: bool = False
    adobe: bool = False
    adobe_transform: int | None = None

    @property
    def pixels(self) -> int:
        """Pixels the image declares."""
        return self.width * self.height

    @property
    def sampling(self) -> list[tuple[int, int]]:
        """The ``(horizontal, vertical)`` sampling factors of the components."""
        return [(horizontal, vertical) for _, horizontal, vertical in self.components]

    def decodes_as_tensorflow(self, grayscale: bool) -> bool:
        """Whether :meth:`~s3cache.spec.ImageSpec.decode` gives TensorFlow's own pixels for this JPEG.

        It does for gray and RGB JPEGs whose chroma is sampled 4:4:4, 4:2:2 or 4:2:0 (or not read, for a
        gray output): Pillow's fast mode upsamples chroma differently, which
        :class:`~s3cache.tfcolor.JpegPixels` redoes in those layouts only. Others (CMYK, rarer samplings)
        are Pillow's own accurate decode, about 1 level apart.
        """
        if len(self.components) not in (1, 3):
            return False
        sampling = self.sampling
        return len(set(sampling)) == 1 or (self._is_ycbcr() and (grayscale or _is_halved(sampling)))

    def _is_ycbcr(self) -> bool:
        """Whether three components are YCbCr-coded, by libjpeg's rule.

        JFIF means YCbCr; else an Adobe marker's transform says; else the component IDs 'R', 'G', 'B' mean RGB.
        """
        if self.jfif:
            return True
        if self.adobe:
            return self.adobe_transform != 0
        return tuple(component_id for component_id, _, _ in self.components) != _RGB_IDS


def _is_halved(sampling: list[tuple[int, int]]) -> bool:
    """Whether each chroma plane has luma's resolution, or half its columns, or half its columns and rows."""
    (luma_h, luma_v), chroma = sampling[0], sampling[1:]
    return all((luma_h / h, luma_v / v) in {(1, 1), (2, 1), (2, 2)} for h, v in chroma)


def layout_of(image: Image.Image) -> JpegLayout:
    """The layout of a JPEG Pillow opened (not loaded); a mode other than L or RGB has no components here."""
    components = tuple((int(layer[0]), int(layer[1]), int(layer[2])) for layer in getattr(image, "layer", ()))
    if image.mode not in ("L", "RGB"):
        components = ()
    return JpegLayout(image.width, image.height, components, jfif="jfif" in image.info,
                      adobe="adobe" in image.info, adobe_transform=image.info.get("adobe_transform"))


def read_layout(data: bytes) -> JpegLayout | None:
    """The layout of a JPEG read from its header, or ``None`` where only Pillow should judge it.

    ``None`` for anything but markers in their plain form up to the first scan: an 8-bit baseline,
    extended or progressive frame of one or three components, and none of the markers Pillow reads
    further (EXIF, ICC fragments other than well-formed ones, MPF, Photoshop), nor fill bytes or
    junk between markers, nor an image past Pillow's pixel limit.
    """
    if not data.startswith(_SOI):
        return None
    position, end = 2, len(data)
    frame: tuple[int, int, tuple[tuple[int, int, int], ...]] | None = None
    jfif = adobe = False
    adobe_transform: int | None = None
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        length = (data[position + 2] << 8) | data[position + 3]
        body_start, body_end = position + 4, position + 2 + length
        if length < 2 or body_end > end:
            return None
        if marker == _SOS:
            if frame is None:
                return None
            return _checked(JpegLayout(*frame, jfif=jfif, adobe=adobe, adobe_transform=adobe_transform))
        body = data[body_start:body_end]
        if marker in _SOF_MARKERS:
            if frame is not None:
                return None
            frame = _frame(body)
            if frame is None:
                return None
        elif marker == _DQT:
            if not _plain_quantization_tables(body):
                return None
        elif marker == _APP0:
            if body.startswith(b"JFIF"):
                if len(body) < 7:
                    return None
                jfif = True
        elif marker == _APP1:
            if body.startswith(b"Exif\0\0"):
                return None  # Pillow reads EXIF for the resolution: only it knows what a damaged one does
        elif marker == _APP2:
            if not (body.startswith(b"ICC_PROFILE\0") and len(body) >= 14):
                return None
        elif marker == _APP14:
            if body.startswith(b"Adobe"):
                if len(body) < 7:
                    return None
                adobe = True
                if len(body) > 11:  # else a transform read from an earlier Adobe marker stays, as in Pillow
                    adobe_transform = body[11]
        elif marker not in _PLAIN_MARKERS:
            return None
        position = body_end
    return None


def _frame(body: bytes) -> tuple[int, int, tuple[tuple[int, int, int], ...]] | None:
    """``(width, height, components)`` of a start-of-frame body, or ``None`` if not plain."""
    if len(body) < 6 or body[0] != 8:
        return None
    height, width, count = (body[1] << 8) | body[2], (body[3] << 8) | body[4], body[5]
    if count not in (1, 3) or len(body) != 6 + 3 * count or not width or not height:
        return None
    components = tuple((body[i], body[i + 1] >> 4, body[i + 1] & 15) for i in range(6, len(body), 3))
    if any(not horizontal or not vertical for _, horizontal, vertical in components):
        return None
    return width, height, components


def _plain_quantization_tables(body: bytes) -> bool:
    """Whether a DQT body is whole tables, as Pillow requires."""
    position = 0
    while position < len(body):
        precision = 1 if body[position] >> 4 == 0 else 2
        position += 1 + 64 * precision
        if position > len(body):
            return False
    return True


def _checked(layout: JpegLayout) -> JpegLayout | None:
    """The layout, unless the image is past the pixel count at which Pillow warns or refuses."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is not None and layout.pixels > limit else layout
