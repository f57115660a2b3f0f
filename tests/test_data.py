"""Tests of efdit.data: the in-memory hierarchical datasets (digits, fmnist, emoji, folder) and build_dataset."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efdit.data import DATASETS, HierarchicalDataset, Hierarchy, build_dataset
from efdit.data.base import to_uint8
from efdit.data.emoji import emoji_npm_root
from efdit.data.fmnist import fmnist_root
from efdit.errors import EfditError

REPO = Path(__file__).resolve().parents[1]


# ---- digits (always available: ships with scikit-learn) --------------------------------------------
@pytest.fixture(scope="module")
def digits_train():
    return build_dataset("digits", "train")


def test_digits_shapes_ranges_and_splits(digits_train):
    test, every = build_dataset("digits", "test"), build_dataset("digits", "all")
    assert len(every) == 1797 and len(digits_train) == 1442 and len(test) == 355
    assert digits_train.images.shape == (1442, 1, 8, 8) and digits_train.images.dtype == torch.uint8
    assert digits_train.num_channels == 1 and digits_train.image_size == (8, 8)
    assert int(every.images.min()) == 0 and int(every.images.max()) == 255  # 0..16 scaled to 0..255
    assert torch.equal(digits_train.class_counts() + test.class_counts(), every.class_counts())
    assert (test.class_counts() >= 34).all()  # stratified: every digit is in the test split
    assert torch.equal(build_dataset("digits", "test").images, test.images)  # deterministic


def test_digits_made_up_hierarchy(digits_train):
    h = digits_train.hierarchy
    assert h.sub_names == [str(d) for d in range(10)]
    assert h.super_names == ["loops", "straight", "curves"]
    groups = {h.super_names[s]: h.children(s) for s in range(h.num_super)}
    assert groups == {"loops": [0, 6, 8, 9], "straight": [1, 4, 7], "curves": [2, 3, 5]}
    assert torch.equal(digits_train.super_labels, h.parent[digits_train.sub_labels])


def test_digits_resize_and_channels():
    ds = build_dataset("digits", "test", image_size=16, channels=3)
    assert ds.images.shape == (355, 3, 16, 16)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # gray repeated


def test_getitem_range_and_labels(digits_train):
    for i in (0, 7, len(digits_train) - 1):
        x, sub, sup = digits_train[i]
        assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        assert sub == int(digits_train.sub_labels[i]) and sup == int(digits_train.hierarchy.parent[sub])
        assert torch.equal(to_uint8(x), digits_train.images[i])  # exact round trip
    xs = torch.stack([digits_train[i][0] for i in range(len(digits_train))])
    assert float(xs.min()) == -1.0 and float(xs.max()) == 1.0


def test_sample_batch(digits_train):
    x, sub, sup = digits_train.sample_batch(64, torch.Generator().manual_seed(3))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and sub.shape == sup.shape == (64,)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(sup, digits_train.hierarchy.parent[sub])
    x2, sub2, _ = digits_train.sample_batch(64, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(sub, sub2)


def test_subset_per_class_balance(digits_train):
    a = digits_train.subset_per_class(5, seed=0)
    assert len(a) == 50 and a.class_counts().tolist() == [5] * 10
    assert torch.equal(a.super_labels, a.hierarchy.parent[a.sub_labels])
    assert torch.equal(a.images, digits_train.subset_per_class(5, seed=0).images)  # deterministic
    assert not torch.equal(a.images, digits_train.subset_per_class(5, seed=1).images)
    with pytest.raises(EfditError, match="fewer than 1000 images of subclass"):
        digits_train.subset_per_class(1000)
    every = digits_train.subset_per_class(1000, allow_fewer=True)
    assert torch.equal(every.class_counts(), digits_train.class_counts())


def test_construction_validation():
    h = Hierarchy(["a", "b", "c"], ["x", "y"], torch.tensor([0, 0, 1]))
    imgs = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(EfditError, match="has no images"):
        HierarchicalDataset(imgs[:0], torch.zeros(0, dtype=torch.long), h, "toy")
    with pytest.raises(EfditError, match="subclass 'c'"):
        HierarchicalDataset(imgs, torch.tensor([0, 1, 0, 1]), h, "toy")
    ds = HierarchicalDataset(imgs, torch.tensor([0, 1, 0, 1]), h, "toy", allow_empty_classes=True)
    assert ds.class_counts().tolist() == [2, 2, 0] and ds.super_counts().tolist() == [4, 0]


# ---- build_dataset ---------------------------------------------------------------------------------
def test_build_dataset_errors():
    with pytest.raises(EfditError) as e:
        build_dataset("fmnst")
    msg = str(e.value)
    assert "unknown dataset 'fmnst'" in msg and "did you mean 'fmnist'" in msg
    assert "known: digits, emoji, fmnist, folder" in msg
    assert set(DATASETS) == {"digits", "emoji", "fmnist", "folder", "inat21", "vegfru"}
    with pytest.raises(EfditError, match="needs root"):
        build_dataset("folder")
    with pytest.raises(EfditError, match="does not take"):
        build_dataset("digits", super_level="group")
    with pytest.raises(EfditError, match="does not take colour"):
        build_dataset("digits", colour=True)
    with pytest.raises(EfditError, match="unknown digits split"):
        build_dataset("digits", "validation")


def test_import_is_light():
    code = "import sys, efdit.data; print(sorted(m for m in ('sklearn', 'PIL', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_install_script_syntax():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "install_data.sh")], check=True)


# ---- Fashion-MNIST (Debian dataset-fashion-mnist) --------------------------------------------------
FMNIST_PRESENT = (fmnist_root() / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not FMNIST_PRESENT, reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist (or set EFDIT_FMNIST_ROOT)")


@needs_fmnist
def test_fmnist_train_and_test():
    tr, te = build_dataset("fmnist", "train"), build_dataset("fmnist", "test")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.class_counts().tolist() == [6000] * 10 and te.class_counts().tolist() == [1000] * 10
    assert tr.sub_labels[:5].tolist() == [9, 0, 0, 3, 0]  # the standard first training labels
    assert te.sub_labels[:5].tolist() == [9, 2, 1, 1, 6]


@needs_fmnist
def test_fmnist_hierarchy_and_resize():
    ds = build_dataset("fmnist", "test", image_size=16, channels=3)
    assert ds.images.shape == (10000, 3, 16, 16)
    h = ds.hierarchy
    assert h.sub_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                           "Ankle boot"]
    assert h.super_names == ["tops", "bottoms+dresses", "footwear", "bag"]
    assert h.parent.tolist() == [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]
    assert {h.super_names[s]: [h.sub_names[i] for i in h.children(s)] for s in range(4)} == {
        "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"], "bottoms+dresses": ["Trouser", "Dress"],
        "footwear": ["Sandal", "Sneaker", "Ankle boot"], "bag": ["Bag"]}


def _write_idx(path: Path, magic: int, data: np.ndarray, gz: bool = True):
    import gzip
    raw = np.array([magic, *data.shape], dtype=">i4").tobytes() + data.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def test_fmnist_idx_parsing_on_fake_files(tmp_path):
    """The IDX reader on tiny fake files (runs without the Debian package; plain and .gz files)."""
    x = np.arange(10 * 28 * 28).reshape(10, 28, 28) % 251
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.arange(10)[::-1])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", 2051, x[:10], gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", 2049, np.arange(10), gz=False)
    ds = build_dataset("fmnist", "all", root=tmp_path)
    assert ds.images.shape == (20, 1, 28, 28) and torch.equal(ds.images[0, 0], torch.from_numpy(x[0]).to(torch.uint8))
    assert ds.sub_labels.tolist() == list(range(9, -1, -1)) + list(range(10))
    assert ds.super_labels[:2].tolist() == [2, 3]  # Ankle boot -> footwear, Bag -> bag
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes((tmp_path / "t10k-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(EfditError, match="truncated"):
        build_dataset("fmnist", "test", root=tmp_path)


def test_fmnist_missing_files_error(tmp_path, monkeypatch):
    with pytest.raises(EfditError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fmnist", root=tmp_path)
    monkeypatch.setenv("EFDIT_FMNIST_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(EfditError, match="nowhere"):
        build_dataset("fmnist")


# ---- emoji (npm emoji-datasource-google / -twitter) ------------------------------------------------
EMOJI_PRESENT = (emoji_npm_root() / "emoji-datasource-google" / "emoji.json").is_file()
needs_emoji = pytest.mark.skipif(
    not EMOJI_PRESENT, reason="emoji npm data absent: run scripts/install_data.sh --emoji (or set EFDIT_EMOJI_NPM)")


@pytest.fixture(scope="module")
def emoji():
    return build_dataset("emoji")


@needs_emoji
def test_emoji_default_hierarchy(emoji):
    h = emoji.hierarchy
    assert h.level_names == ("subgroup", "emoji") and h.num_sub == 290 and h.num_super == 15
    assert len(emoji) == 580 and (emoji.class_counts() == 2).all()  # google + twitter
    known = {"eagle": "animal-bird", "penguin": "animal-bird", "grapes": "food-fruit", "frog": "animal-amphibian",
             "hot_pepper": "food-vegetable", "octopus": "animal-marine", "sushi": "food-asian", "tulip": "plant-flower"}
    for name, parent in known.items():
        assert h.super_names[int(h.parent[h.sub_id(name)])] == parent, name
    for group, subgroup, name in emoji.paths:  # the three-level paths agree with the two kept levels
        assert group in ("Animals & Nature", "Food & Drink")
        assert int(h.parent[h.sub_id(name)]) == h.super_id(subgroup)
    assert torch.equal(emoji.sub_labels, emoji.emoji_labels)  # sub_level="emoji": one subclass per path


@needs_emoji
def test_emoji_images_rgb_on_white(emoji):
    assert emoji.images.shape == (580, 3, 32, 32) and emoji.images.dtype == torch.uint8
    corners = emoji.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 3, 4)
    white = (corners == 255).all(1).all(1)
    assert white.float().mean() > 0.85  # transparent corners became white, not black
    assert int((corners == 0).all(1).sum()) == 0
    assert emoji.style_labels.tolist().count(0) == emoji.style_labels.tolist().count(1) == 290


@needs_emoji
def test_emoji_levels_and_filters():
    ds = build_dataset("emoji", super_level="group", sub_level="subgroup", image_size=16)
    h = ds.hierarchy
    assert h.level_names == ("group", "subgroup") and h.super_names == ["Animals & Nature", "Food & Drink"]
    assert h.num_sub == 15 and h.super_names[int(h.parent[h.sub_id("animal-bird")])] == "Animals & Nature"
    assert ds.images.shape[1:] == (3, 16, 16)
    people = build_dataset("emoji", categories=("People & Body",), channels=1, image_size=8)
    assert not any("skin-tone" in p[2] for p in people.paths) and len(people) == 2 * len(people.paths)
    assert people.images.shape[1] == 1
    with pytest.raises(EfditError, match="must lie above"):
        build_dataset("emoji", super_level="emoji", sub_level="group")
    with pytest.raises(EfditError, match="did you mean 'Animals & Nature'"):
        build_dataset("emoji", categories=("Animals and Nature",))
    with pytest.raises(EfditError, match="Component"):
        build_dataset("emoji", categories=("Component",))


@needs_emoji
def test_emoji_optional_emojione_style(tmp_path, monkeypatch):
    Image.new("P", (64, 64), 5).save(tmp_path / "1F985.png")  # a fake EmojiOne "eagle" (palette PNG)
    monkeypatch.setenv("GEMOJIONE_PNG", str(tmp_path))
    ds = build_dataset("emoji", image_size=8)
    assert ds.styles == ("google", "twitter", "emojione") and len(ds) == 581
    eagle = ds.hierarchy.sub_id("eagle")
    assert ds.style_labels[ds.sub_labels == eagle].tolist() == [0, 1, 2]
    monkeypatch.setenv("GEMOJIONE_PNG", str(tmp_path / "absent"))
    assert build_dataset("emoji", image_size=8).styles == ("google", "twitter")
    with pytest.raises(EfditError, match="GEMOJIONE_PNG"):
        build_dataset("emoji", styles=("google", "emojione"))


def test_emoji_missing_error(tmp_path):
    with pytest.raises(EfditError, match="npm install"):
        build_dataset("emoji", root=tmp_path / "none")


# ---- folder (users' own images) --------------------------------------------------------------------
def _png(path: Path, color=(200, 30, 30), size=(12, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def tree(tmp_path):
    """root/animals/{cat,dog}, root/food/apple; one corrupt PNG in cat; one wide 3-stripe image in apple."""
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "animals" / "cat" / f"c{i}.png", (250, 0, 0))
        _png(root / "animals" / "dog" / f"d{i}.jpg", (0, 0, 250))
    (root / "animals" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)  # (H, W, 3): red | green | blue thirds
    stripes[:, :20, 0] = stripes[:, 20:40, 1] = stripes[:, 40:, 2] = 255
    (root / "food" / "apple").mkdir(parents=True)
    Image.fromarray(stripes).save(root / "food" / "apple" / "wide.png")
    _png(root / "food" / "apple" / "clear.png", (0, 0, 0, 0), mode="RGBA")  # fully transparent -> white
    (root / "food" / "apple" / "notes.txt").write_text("not an image")
    return root


def test_folder_skip_bad_image(tree):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\).*bad\.png"):
        ds = build_dataset("folder", root=tree, image_size=8)
    assert len(ds) == 8 and ds.images.shape == (8, 3, 8, 8)
    assert ds.hierarchy.super_names == ["animals", "food"] and ds.hierarchy.sub_names == ["cat", "dog", "apple"]
    assert ds.hierarchy.parent.tolist() == [0, 0, 1] and ds.class_counts().tolist() == [3, 3, 2]
    assert ds.files == sorted(ds.files[:3]) + sorted(ds.files[3:6]) + ["food/apple/clear.png", "food/apple/wide.png"]
    assert len(ds.info["skipped_files"]) == 1
    wide = ds.images[ds.files.index("food/apple/wide.png")]  # (3, 8, 8): center crop keeps the green third
    assert wide.shape == (3, 8, 8) and (wide[1] > 200).all() and (wide[0] < 60).all() and (wide[2] < 60).all()
    assert (ds.images[ds.files.index("food/apple/clear.png")] == 255).all()


def test_folder_run_says_skipped_files_in_one_line_and_lists_them(tree, tmp_path):
    """On the command line a folder run's unreadable images are one `efdit: warning:` line (no source line under
    it), the run folder is named after the data, lists every skipped file, and suggests fine-tuning a base."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "efdit.cli", "train", "--dataset", "folder", "--root", str(tree),
                        "--image-size", "8", "--model.patch_size", "2", "--hidden-size", "32", "--depth", "1",
                        "--num-heads", "2", "--total-images", "16", "--batch-size", "8", "--warmup-images", "0",
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(lines) == 1 and lines[0].startswith("efdit: warning: skipped 1 unreadable image(s)"), r.stderr
    assert "warnings.warn" not in r.stderr and "UserWarning" not in r.stderr
    run = tmp_path / "runs" / tree.name
    assert (run / "model.safetensors").is_file()
    assert (run / "skipped-images.txt").read_text().splitlines() == [str(tree / "animals" / "cat" / "bad.png")]
    assert r.stdout.count("fine-tuning a shipped base is the faster path") == 1


def test_folder_fail_bad_image(tree):
    with pytest.raises(EfditError, match=r"bad\.png"):
        build_dataset("folder", root=tree, on_bad_image="fail")


def test_folder_tall_image_gray_and_size(tmp_path):
    tall = np.zeros((90, 30), dtype=np.uint8)
    tall[30:60] = 255  # white middle third of a black column
    (tmp_path / "s" / "t").mkdir(parents=True)
    Image.fromarray(tall).save(tmp_path / "s" / "t" / "tall.png")
    ds = build_dataset("folder", root=tmp_path, image_size=(6, 10), channels=1)
    assert ds.images.shape == (1, 1, 6, 10) and (ds.images > 200).all()


def test_folder_empty_class_and_root(tree, tmp_path):
    (tree / "food" / "pear").mkdir()
    with pytest.warns(UserWarning), pytest.raises(EfditError, match="food/pear"):
        build_dataset("folder", root=tree)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EfditError, match="no images found"):
        build_dataset("folder", root=empty)
    with pytest.raises(EfditError, match="does not exist"):
        build_dataset("folder", root=tmp_path / "missing")


def test_folder_duplicate_subclass_name(tmp_path):
    _png(tmp_path / "a" / "other" / "x.png")
    _png(tmp_path / "b" / "other" / "y.png")
    with pytest.raises(EfditError, match="'other' appears under both"):
        build_dataset("folder", root=tmp_path)


def test_holdout_is_a_disjoint_class_balanced_part_of_the_train_split():
    from efdit.config import build_config
    from efdit.engine.datasets import load_data
    cfg = build_config("digits-tiny", {"data.holdout_per_class": 5})
    rest, held = load_data(cfg, "train"), load_data(cfg, "holdout")
    whole = load_data(build_config("digits-tiny", {}), "train")
    assert len(rest) + len(held) == len(whole) and held.class_counts().tolist() == [5] * 10
    both = torch.cat([rest.images.flatten(1), held.images.flatten(1)])
    assert torch.equal(both.sort(0).values, whole.images.flatten(1).sort(0).values)   # a partition of the split
    again = load_data(cfg, "holdout")
    assert torch.equal(again.images, held.images) and held.split == "train-holdout"   # the same part every time
    with pytest.raises(EfditError, match="no held-out split"):
        load_data(build_config("digits-tiny", {}), "holdout")


def test_few_shot_training_split_excludes_the_holdout():
    from efdit.config import build_config
    from efdit.engine.datasets import load_data
    cfg = build_config("digits-tiny", {"data.holdout_per_class": 5, "data.train_per_class": 20})
    train, held = load_data(cfg, "train"), load_data(cfg, "holdout")
    assert train.class_counts().tolist() == [20] * 10 and held.class_counts().tolist() == [5] * 10
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in rows for x in held.images)   # no held-out image is trained on
    assert torch.equal(load_data(cfg, "train").images, train.images)           # the same few images every time


def test_folder_with_split_folders_reads_each_split_from_its_own_tree(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for sup, sub in (("animals", "cat"), ("food", "apple")):
            for i in range(n):
                _png(tmp_path / split / sup / sub / f"{i}.png", (i * 40, 0, 0))
    train = build_dataset("folder", root=tmp_path, split="train", image_size=8)
    test = build_dataset("folder", root=tmp_path, split="test", image_size=8)
    assert (len(train), len(test)) == (6, 4) and train.hierarchy == test.hierarchy
    lazy = build_dataset("folder", root=tmp_path, split="test", image_size=8, lazy=True)
    assert len(lazy) == 4
    with pytest.raises(EfditError, match="holds split folders .* but no val/"):
        build_dataset("folder", root=tmp_path, split="val", image_size=8)
