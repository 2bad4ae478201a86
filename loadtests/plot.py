"""Line plots written as PNG with the standard library only (zlib + struct).

The load-testing kit also runs where matplotlib is not installed (the GPU machine), so the
plots are drawn on a small RGB raster with a built-in 3x5 pixel font.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Color = tuple[int, int, int]
PALETTE: list[Color] = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14)]
# Each glyph: 5 rows of 3 pixels, one octal digit per row (most significant bit on the left).
_GLYPHS = {
    "0": "75557", "1": "26227", "2": "71747", "3": "71317", "4": "55711",
    "5": "74717", "6": "74757", "7": "71222", "8": "75757", "9": "75717",
    "A": "25755", "B": "65656", "C": "34443", "D": "65556", "E": "74647",
    "F": "74644", "G": "34553", "H": "55755", "I": "72227", "J": "11152",
    "K": "55655", "L": "44447", "M": "57755", "N": "65555", "O": "25552",
    "P": "65644", "Q": "25563", "R": "65655", "S": "34216", "T": "72222",
    "U": "55557", "V": "55552", "W": "55775", "X": "55255", "Y": "55222",
    "Z": "71247", " ": "00000", ".": "00002", ",": "00024", "-": "00700",
    "/": "11244", "(": "24442", ")": "21112", "%": "51245", ":": "02020",
    "_": "00007", "=": "07070", "+": "02720",
}  # fmt: skip


def png_bytes(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of `rgb` (rows top to bottom, 3 bytes a pixel)."""
    assert len(rgb) == width * height * 3, (len(rgb), width, height)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    stride = width * 3
    # each scanline starts with its filter type (0: none)
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


class Canvas:
    """An RGB raster with lines, rectangles and text."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def dot(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for y in range(max(y0, 0), min(y1, self.height)):
            for x in range(max(x0, 0), min(x1, self.width)):
                self.dot(x, y, color)

    def line(
        self, a: tuple[float, float], b: tuple[float, float], color: Color, width: int = 1,
        dash: int = 0,
    ) -> None:  # fmt: skip
        (x0, y0), (x1, y1) = a, b
        steps = max(int(max(abs(x1 - x0), abs(y1 - y0))), 1)
        half = width // 2
        for i in range(steps + 1):
            if dash and (i // dash) % 2:
                continue
            x = round(x0 + (x1 - x0) * i / steps)
            y = round(y0 + (y1 - y0) * i / steps)
            self.rect(x - half, y - half, x - half + width, y - half + width, color)

    def text(self, x: int, y: int, s: str, color: Color = (0, 0, 0), scale: int = 2) -> None:
        for k, ch in enumerate(s.upper()):
            rows = _GLYPHS.get(ch, _GLYPHS["-"])
            for r, digit in enumerate(rows):
                bits = int(digit, 8)
                for c in range(3):
                    if bits & (4 >> c):
                        px, py = x + (k * 4 + c) * scale, y + r * scale
                        self.rect(px, py, px + scale, py + scale, color)

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return (len(s) * 4 - 1) * scale

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(png_bytes(self.width, self.height, bytes(self.pixels)))


def nice_ceiling(value: float) -> float:
    """The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) >= value (> 0)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    base = 10 ** math.floor(math.log10(value))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * base >= value * (1 - 1e-9):
            return m * base
    return 10 * base


def tick_label(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:g}K"
    return f"{v:g}" if v >= 1 or v == 0 else f"{v:.2g}"


@dataclass
class Series:
    label: str
    values: Sequence[float | None]  # one per x; None: no point
    color: Color
    dashed: bool = False


def line_plot(
    path: str | Path,
    title: str,
    x_label: str,
    y_label: str,
    xs: Sequence[int | float],
    series: Sequence[Series],
    size: tuple[int, int] = (640, 400),
) -> None:
    """Lines over categorical x positions (evenly spaced, labelled with `xs`)."""
    width, height = size
    c = Canvas(width, height)
    left, right, top, bottom = 64, 16, 64, 56
    pw, ph = width - left - right, height - top - bottom
    points = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    y_max = nice_ceiling(1.05 * max(points, default=1.0))
    c.text(left, 8, title, scale=2)
    c.text(4, top - 18, y_label, (80, 80, 80), scale=2)
    grid, axis = (225, 225, 225), (60, 60, 60)
    for k in range(6):
        y = top + ph - ph * k / 5
        c.line((left, y), (left + pw, y), grid)
        label = tick_label(y_max * k / 5)
        c.text(left - 6 - c.text_width(label), round(y) - 5, label, axis)

    def px(i: int) -> float:
        return left + (pw * (i + 0.5) / len(xs) if len(xs) > 1 else pw / 2)

    for i, x in enumerate(xs):
        c.line((px(i), top + ph), (px(i), top + ph + 4), axis)
        label = tick_label(x)
        c.text(round(px(i)) - c.text_width(label) // 2, top + ph + 8, label, axis)
    c.text(left + pw // 2 - c.text_width(x_label) // 2, height - 22, x_label, axis)
    c.line((left, top), (left, top + ph), axis)
    c.line((left, top + ph), (left + pw, top + ph), axis)
    for s in series:
        pts = [
            (px(i), top + ph - ph * v / y_max)
            for i, v in enumerate(s.values)
            if v is not None and math.isfinite(v)
        ]
        for a, b in zip(pts, pts[1:], strict=False):
            c.line(a, b, s.color, width=2, dash=6 if s.dashed else 0)
        for x, y in pts:
            c.rect(round(x) - 3, round(y) - 3, round(x) + 4, round(y) + 4, s.color)
    # legend: one row between the title and the plot
    lx = left
    for s in series:
        c.line((lx, 34), (lx + 20, 34), s.color, width=2, dash=4 if s.dashed else 0)
        c.text(lx + 26, 30, s.label, (30, 30, 30))
        lx += 26 + c.text_width(s.label) + 18
    c.save(path)
