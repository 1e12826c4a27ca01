"""Draws the kernelspec's PNG logos from the same shapes as supermachine_kernel/logos/logo-svg.svg.

Run once after changing the SVG (needs Pillow): .venv/bin/python tools/draw-logos.py
"""
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent.parent / "supermachine_kernel" / "logos"
S = 16  # supersampling: draw at 16x the 64-unit viewBox, then scale down


def draw(size: int) -> Image.Image:
    img = Image.new("RGBA", (64 * S, 64 * S), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((2 * S, 2 * S, 62 * S, 62 * S), radius=12 * S, fill="#306998")
    d.rounded_rectangle((9 * S, 9 * S, 55 * S, 55 * S), radius=8 * S, outline="#FFD43B", width=4 * S)
    w = 5 * S
    for a, b in (((20, 23), (30, 32)), ((30, 32), (20, 41)), ((33, 42), (44, 42))):
        d.line((a[0] * S, a[1] * S, b[0] * S, b[1] * S), fill="white", width=w)
        for x, y in (a, b):  # round caps and joins
            d.ellipse((x * S - w / 2, y * S - w / 2, x * S + w / 2, y * S + w / 2), fill="white")
    return img.resize((size, size), Image.LANCZOS)


if __name__ == "__main__":
    for size in (32, 64):
        draw(size).save(HERE / f"logo-{size}x{size}.png", optimize=True)
