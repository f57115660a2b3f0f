"""A real RGB image folder of one's own, for trying `--dataset folder`: clip art from Debian's `openclipart-png`
(public domain), 8 subclasses under 2 superclasses, none of it seen by the emoji base.

    apt-get install openclipart-png
    .venv/bin/python scripts/make_clipart_folder.py data/clipart          # root/{train,test}/<super>/<sub>/*.png

signs: flags, road signs, map symbols, arrows; objects: jigsaw pieces, smileys, clocks, fruit. Up to --per-class
files per subclass are taken (every k-th of the sorted list, so the same set every time), transparency composited on
white, scaled to fit --size pixels and centred on a white square; a third of each subclass goes to test/.
Unreadable or very large files are skipped.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from PIL import Image

from efdit.data.folder import _flatten

ROOT = Path("/usr/share/openclipart/png")
CLASSES = {"signs": {"flags": "signs_and_symbols/flags", "roadsigns": "transportation/roadsigns",
                     "map_symbols": "signs_and_symbols/map_symbols", "arrows": "shapes/arrows"},
           "objects": {"jigsaw": "shapes/jigsaw", "smileys": "people/smilies", "clocks": "signs_and_symbols/clocks",
                       "fruit": "food/fruit"}}


def square(path: Path, size: int) -> Image.Image:
    """One clip-art file -> a (size, size) RGB image on white, aspect kept."""
    im = _flatten(Image.open(path), "RGB")     # the folder loader's own flattening: transparency on white
    im.thumbnail((size, size), Image.LANCZOS)
    out = Image.new("RGB", (size, size), "white")
    out.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--source", default=str(ROOT), help="where openclipart-png put its PNGs")
    args = p.parse_args()
    # files over 4096² pixels are skipped, not rasterised: PIL warns above MAX_IMAGE_PIXELS and refuses above twice it
    Image.MAX_IMAGE_PIXELS = 4096 * 4096
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    if not Path(args.source).is_dir():
        sys.exit(f"no clip art at {args.source}: install Debian's openclipart-png (apt-get install openclipart-png)")
    counts = {"train": 0, "test": 0}
    for sup, subs in CLASSES.items():
        for sub, rel in subs.items():
            files = sorted((Path(args.source) / rel).rglob("*.png"))
            files = files[:: max(1, len(files) // args.per_class)][: args.per_class]
            for i, f in enumerate(files):
                try:
                    im = square(f, args.size)
                except (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError):  # unreadable or huge
                    continue
                split = "test" if i % 3 == 2 else "train"
                folder = Path(args.root) / split / sup / sub
                folder.mkdir(parents=True, exist_ok=True)
                im.save(folder / f"{i:03d}.png")
                counts[split] += 1
    n_sub = sum(len(subs) for subs in CLASSES.values())
    print(f"{counts['train']} train + {counts['test']} test images in {n_sub} subclasses under {len(CLASSES)} "
          f"superclasses -> {args.root}")


if __name__ == "__main__":
    main()
