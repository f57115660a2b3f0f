"""A small RGB image folder of one's own, for trying `--dataset folder`: drawn shapes in 8 subclasses under 2
superclasses, none of which the emoji base saw.

    .venv/bin/python scripts/make_shapes_folder.py data/shapes --per-class 40          # root/<super>/<sub>/*.png
    .venv/bin/python scripts/make_shapes_folder.py data/shapes-test --per-class 20 --seed 1

polygons: triangle, square, pentagon, hexagon; curves: circle, ellipse, ring, crescent. Each image: a random
background colour, a random foreground colour far from it, a random size, position and rotation; drawn at 4x and
downsampled (antialiased) to --size pixels.
"""
from __future__ import annotations

import argparse
import colorsys
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = {"polygons": ["triangle", "square", "pentagon", "hexagon"], "curves": ["circle", "ellipse", "ring", "crescent"]}
SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}


def colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A background and a foreground colour with different hue and lightness."""
    h = rng.random()
    bg = colorsys.hls_to_rgb(h, rng.uniform(0.15, 0.35) if rng.random() < 0.5 else rng.uniform(0.7, 0.9),
                             rng.uniform(0.2, 0.8))
    light = 1.0 - (colorsys.rgb_to_hls(*bg)[1])
    fg = colorsys.hls_to_rgb((h + rng.uniform(0.25, 0.75)) % 1.0, min(max(light, 0.2), 0.8), rng.uniform(0.5, 1.0))
    return tuple(int(255 * c) for c in bg), tuple(int(255 * c) for c in fg)


def draw(name: str, size: int, rng: random.Random) -> Image.Image:
    big = 4 * size
    bg, fg = colours(rng)
    im = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(im)
    r = big * rng.uniform(0.22, 0.36)
    cx, cy = (big / 2 + rng.uniform(-0.12, 0.12) * big for _ in range(2))
    rot = rng.uniform(0, 2 * math.pi)
    if name in SIDES:
        n = SIDES[name]
        pts = [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
               for k in range(n)]
        d.polygon(pts, fill=fg)
    elif name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "ellipse":
        a, b = r, r * rng.uniform(0.4, 0.6)
        pts = [(cx + a * math.cos(t) * math.cos(rot) - b * math.sin(t) * math.sin(rot),
                cy + a * math.cos(t) * math.sin(rot) + b * math.sin(t) * math.cos(rot))
               for t in (2 * math.pi * k / 64 for k in range(64))]
        d.polygon(pts, fill=fg)
    elif name == "ring":
        w = r * rng.uniform(0.3, 0.45)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        d.ellipse([cx - r + w, cy - r + w, cx + r - w, cy + r - w], fill=bg)
    else:  # crescent: a disc with an offset disc of the background cut out
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        off = r * rng.uniform(0.45, 0.65)
        ox, oy = cx + off * math.cos(rot), cy + off * math.sin(rot)
        d.ellipse([ox - r, oy - r, ox + r, oy + r], fill=bg)
    return im.resize((size, size), Image.LANCZOS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    n = 0
    for sup, subs in SHAPES.items():
        for sub in subs:
            folder = Path(args.root) / sup / sub
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(args.per_class):
                draw(sub, args.size, rng).save(folder / f"{sub}-{args.seed}-{i:04d}.png")
                n += 1
    print(f"{n} images in 8 subclasses under 2 superclasses -> {args.root}")


if __name__ == "__main__":
    main()
