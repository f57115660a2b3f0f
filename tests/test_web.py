"""`efdit serve`: the page's logic (validation, sampling) and an end-to-end run in headless Chromium.

The browser test starts `efdit serve` on a free loopback port with a tiny checkpoint made here, picks a
superclass and a subclass in Debian's Chromium (driven by Selenium through /usr/bin/chromedriver), clicks
Generate and decodes the images the page shows. It is skipped, saying why, where Chromium, chromedriver,
Selenium or Gradio is missing (`make browser` installs Chromium; `make test` runs it).
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import randomize

from efdit.commands.serve import (
    MAX_SCALE,
    Request,
    ServedModel,
    available_samplers,
    extra_sample_options,
    find_checkpoint,
    generate_for,
    grain_map_images,
    open_model,
    validate,
)
from efdit.config import Config
from efdit.data import Hierarchy
from efdit.engine.build import build_model
from efdit.engine.files import save_model
from efdit.errors import EfditError
from efdit.models.checkpoint import save_safetensors

H, W = 12, 8  # non-square, so a transposed image cannot pass
HIER = Hierarchy(["cat", "dog", "owl", "car", "bus"], ["animals", "vehicles"], torch.tensor([0, 0, 0, 1, 1]))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def make_checkpoint(path: Path) -> Path:
    cfg = Config()
    m = cfg.model
    m.patch_size, m.hidden_size, m.depth, m.num_heads = 2, 32, 2, 2
    cfg.sample.steps, cfg.sample.per_class, cfg.sample.cfg_scale = "4", 2, 3.0
    model = randomize(build_model(cfg, HIER, (H, W), 1), seed=3)
    return save_model(path, model, cfg, HIER, (H, W), 1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("web") / "run" / "model.safetensors")


@pytest.fixture(scope="module")
def served(ckpt) -> ServedModel:
    return ServedModel(ckpt, "cpu")


# ---- the logic behind the page ---------------------------------------------------------------------------
def test_find_checkpoint(ckpt, tmp_path):
    assert find_checkpoint(run=ckpt.parent) == ckpt
    demo = tmp_path / "demo"
    (demo / "train").mkdir(parents=True)
    shutil.copy(ckpt, demo / "train" / "model.safetensors")  # the layout `efdit demo` writes
    assert find_checkpoint(run=demo) == demo / "train" / "model.safetensors"
    with pytest.raises(EfditError, match="no checkpoint: give --run RUN_DIR or --ckpt FILE"):
        find_checkpoint()
    with pytest.raises(EfditError, match="no model file in"):
        find_checkpoint(run=tmp_path)
    with pytest.raises(EfditError, match="checkpoint not found"):
        find_checkpoint(ckpt=tmp_path / "nope.safetensors")
    d2 = tmp_path / "d2"
    d2.mkdir()
    (d2 / "config.json").write_text('{"dvae": {}, "dgt": {}, "dct": {}, "data": {}}')
    assert find_checkpoint(run=d2) == d2                    # a D²iT run folder is served as the folder
    save_safetensors(d2 / "dct.safetensors", {"w": torch.zeros(1)}, {"kind": "d2it", "config": {}})
    with pytest.raises(EfditError, match="is a D²iT stage file outside a D²iT run folder"):
        ServedModel(d2 / "dct.safetensors")
    with pytest.raises(EfditError, match="dvae.safetensors not found: train that stage first"):
        open_model(d2 / "dct.safetensors")                  # a stage file opens its run folder


def test_grain_map_images_are_red_fine_blue_coarse():
    maps = torch.tensor([[[1, 0], [0, 1]]])                       # (1, 2, 2): fine on the diagonal
    img = grain_map_images(maps, 4)                               # (1, 3, 4, 4), 2x2 px per region
    assert img.shape == (1, 3, 4, 4) and img.dtype == torch.uint8
    assert img[0, :, 0, 0].tolist() == [230, 50, 50] and img[0, :, 1, 1].tolist() == [230, 50, 50]
    assert img[0, :, 0, 3].tolist() == [50, 90, 230] and img[0, :, 3, 0].tolist() == [50, 90, 230]


def test_validate_builds_labels_and_refuses_bad_input(served):
    cfg, labels, captions, n = validate(served, Request("vehicles", "bus", "cfg", 4.0, 1.0, 3, "ddim", 7, 3))
    # three samples of "bus" (id 4), then one of each subclass of "vehicles" (car 3, bus 4)
    assert labels.tolist() == [4, 4, 4, 3, 4] and n == 3
    assert captions == ["bus #1", "bus #2", "bus #3", "car", "bus"]
    assert (cfg.sample.cfg_scale, cfg.sample.steps, cfg.sample.seed, cfg.sample.guidance) == (4.0, "3", 7, "cfg")
    assert served.cfg.sample.cfg_scale == 3.0  # the served config is untouched
    ok = dict(superclass="vehicles", subclass="bus", guidance="cfg", scale=2.0, steps=3, sampler="ddim", n=2)
    bad = [(dict(scale=MAX_SCALE + 0.5), f"guidance scale must be between 0 and {MAX_SCALE:g}, not 20.5"),
           (dict(scale=-1.0), "guidance scale must be between 0 and 20, not -1.0"),
           (dict(subclass="buss"), "unknown subclass 'buss'; did you mean 'bus'"),
           (dict(subclass="owl"), "subclass 'owl' is not under superclass 'vehicles' .it is under 'animals'"),
           (dict(superclass="plants"), "unknown superclass 'plants'"),
           (dict(steps=1001), "steps must be a whole number from 1 to 1000"),
           (dict(sampler="euler"), "sampler 'euler' is unknown"),
           (dict(guidance="super"), "guidance 'super' is not available for this model"),
           (dict(n=0), "number of images must be from 1 to 16")]
    for change, message in bad:
        with pytest.raises(EfditError, match=message):
            validate(served, Request(**{**ok, **change}))
    with pytest.raises(EfditError, match="no checkpoint loaded"):
        validate(None, Request(**ok))


def test_generate_for_gives_the_classes_at_model_size(served):
    calls = []
    chosen, family, status = generate_for(served, Request("animals", "dog", "cfg", 2.0, 1.0, 3, "ddim", 0, 2),
                                          progress=lambda done, total: calls.append((done, total)))
    assert [c for _, c in chosen] == ["dog #1", "dog #2"] and [c for _, c in family] == ["cat", "dog", "owl"]
    assert all(im.size == (W, H) and im.mode == "L" for im, _ in chosen + family)
    assert calls == [(0, 3), (1, 3), (2, 3)]  # one progress report per sampling step
    assert status.startswith("5 images in") and "cfg ×2" in status
    # same seed -> same pictures; another seed -> others
    again, _, _ = generate_for(served, Request("animals", "dog", "cfg", 2.0, 1.0, 3, "ddim", 0, 2))
    other, _, _ = generate_for(served, Request("animals", "dog", "cfg", 2.0, 1.0, 3, "ddim", 1, 2))
    px = [np.asarray(im) for im, _ in chosen]
    assert all((a == np.asarray(b)).all() for a, (b, _) in zip(px, again))
    assert not (px[0] == np.asarray(other[0][0])).all()


def test_every_offered_sampler_and_option_runs(served):
    samplers = available_samplers()
    assert samplers[:2] == ["ddpm", "ddim"]
    for name in samplers:  # dpmpp2m too, where this efdit has it
        chosen, _, status = generate_for(served, Request("animals", "owl", "cfg", 2.0, 1.0, 3, name, 0, 1))
        assert chosen[0][0].size == (W, H) and f"· {name} 3 steps" in status
    extras = extra_sample_options()
    if "hrig" in extras:
        with pytest.raises(EfditError, match="--hrig 'nonsense'"):
            generate_for(served, Request("animals", "owl", "cfg", 2.0, 1.0, 3, "ddim", 0, 1, {"hrig": "nonsense"}))
    if "accel" in extras:
        opts = {"accel": "fora", "accel_kwargs": "interval=2"}
        chosen, _, _ = generate_for(served, Request("animals", "owl", "cfg", 2.0, 1.0, 4, "ddim", 0, 1, opts))
        assert chosen[0][0].size == (W, H)
        with pytest.raises(EfditError, match="foraa"):
            generate_for(served, Request("animals", "owl", "cfg", 2.0, 1.0, 3, "ddim", 0, 1, {"accel": "foraa"}))
    with pytest.raises(EfditError, match="option 'turbo' is not available"):
        validate(served, Request("animals", "owl", "cfg", 2.0, 1.0, 3, "ddim", 0, 1, {"turbo": "1"}))


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    from efdit.cli import main as cli_main
    assert cli_main(["serve", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efdit: error: no model file in") and "\n" not in err
    assert cli_main(["serve", "--ckpt", str(tmp_path / "x.safetensors"), "--port", "0"]) == 2
    assert "--port must be a port from 1 to 65535, got '0'" in capsys.readouterr().err


def test_cli_and_web_modules_do_not_import_gradio():
    code = "import sys, efdit, efdit.cli, efdit.commands.serve; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- D²iT runs: each image beside its grain map ----------------------------------------------------------
D2_SIZE, D2_REGION = 16, 4  # 16 px images, f1 = 2 -> 4 px regions: a 4x4 grain map, an 8x8 latent


def make_d2it_run(run: Path, hierarchy: Hierarchy | None = HIER, num_classes: int = 5) -> Path:
    """A D²iT run folder as `efdit d2it train` writes it (config.json + stage files), random tiny weights."""
    from efdit.d2it.config import build_d2it_config
    from efdit.d2it.dct import build_dct
    from efdit.d2it.dgt import build_dgt
    from efdit.d2it.dvae import build_dvae
    from efdit.engine.d2it_train import save_stage
    cfg = build_d2it_config("fmnist32", {
        "run_dir": str(run), "data.dataset": "digits", "data.image_size": D2_SIZE, "dvae.ch": 8,
        "dvae.z_channels": 2, "dvae.groups": 4, "dgt.hidden_size": 32, "dgt.depth": 2, "dgt.num_heads": 2,
        "dgt.sample_steps": 3, "dct.hidden_size": 32, "dct.trunk_depth": 1, "dct.refine_depth": 1,
        "dct.num_heads": 2, "sample.steps": "4", "sample.cfg_scale": 2.0})
    run.mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    meta = {"hierarchy": hierarchy.to_dict()} if hierarchy is not None else {}
    save_stage(run / "dvae.safetensors", randomize(build_dvae(cfg, 1), 4, 0.1), cfg, in_channels=1, **meta)
    save_stage(run / "dgt.safetensors", randomize(build_dgt(cfg, num_classes), 5, 0.3), cfg,
               num_classes=num_classes, **meta)
    save_stage(run / "dct.safetensors", randomize(build_dct(cfg, 2, num_classes), 6, 0.1), cfg, in_channels=2,
               num_classes=num_classes)
    return run


@pytest.fixture(scope="module")
def d2run(tmp_path_factory) -> Path:
    return make_d2it_run(tmp_path_factory.mktemp("web-d2it") / "d2it-tiny")


@pytest.fixture(scope="module")
def d2served(d2run):
    return open_model(find_checkpoint(run=d2run), "cpu")


def test_d2it_run_opens_with_its_hierarchy_and_options(d2run, d2served, tmp_path):
    from efdit.commands.serve_d2it import D2iTServed
    assert find_checkpoint(run=d2run) == d2run and isinstance(d2served, D2iTServed) and d2served.d2it
    assert d2served.hierarchy.to_dict() == HIER.to_dict() and d2served.hierarchy_source == "dgt.safetensors"
    assert d2served.subclasses_of("vehicles") == ["car", "bus"]
    assert d2served.guidance_modes() == ["cfg", "none"] and d2served.max_steps == 1000
    assert d2served.defaults() == {"guidance": "cfg", "scale": 2.0, "scale_super": 1.5, "steps": 4,
                                   "sampler": "ddpm"}
    assert isinstance(open_model(d2run / "dct.safetensors"), D2iTServed)  # a stage file opens its run
    # an older run (no hierarchy in its files): the hierarchy of the dataset in its config, as `d2it sample` does
    old = open_model(make_d2it_run(tmp_path / "old", hierarchy=None, num_classes=10))
    assert old.hierarchy_source == "the digits dataset" and old.hierarchy.sub_names == [str(d) for d in range(10)]
    assert old.subclasses_of("straight") == ["1", "4", "7"]
    with pytest.raises(EfditError, match="the DCT has 5 classes but the hierarchy .the digits dataset. has 10"):
        open_model(make_d2it_run(tmp_path / "bad", hierarchy=None, num_classes=5))


def test_d2it_validate_refuses_what_d2it_lacks(d2served):
    cfg, labels, captions, n = validate(d2served, Request("vehicles", "bus", "cfg", 3.0, 0.5, 6, "ddim", 9, 2))
    assert labels.tolist() == [4, 4, 3, 4] and captions == ["bus #1", "bus #2", "car", "bus"] and n == 2
    assert (cfg.cfg_scale, cfg.grain_cfg_scale, cfg.steps, cfg.sampler, cfg.seed) == (3.0, 0.5, "6", "ddim", 9)
    assert d2served.cfg.sample.cfg_scale == 2.0                        # the served config is untouched
    off, _, _, _ = validate(d2served, Request("vehicles", "bus", "none", 3.0, 0.5, 6, "ddim", 9, 2))
    assert (off.cfg_scale, off.grain_cfg_scale) == (1.0, 1.0)          # "none": no guidance on DCT nor DGT
    ok = dict(superclass="vehicles", subclass="bus", guidance="cfg", scale=2.0, steps=3, sampler="ddpm", n=2)
    bad = [(dict(guidance="two_term"), "guidance 'two_term' is not available for this model .choose cfg, none."),
           (dict(steps=1001), "steps must be a whole number from 1 to 1000"),
           (dict(subclass="owl"), "subclass 'owl' is not under superclass 'vehicles'"),
           (dict(scale_super=25.0), "superclass guidance scale must be between 0 and 20"),
           (dict(extras={"hrig": "x"}), "option 'hrig' does not apply to D²iT runs")]
    for change, message in bad:
        with pytest.raises(EfditError, match=message):
            validate(d2served, Request(**{**ok, **change}))


def test_d2it_generate_pairs_each_image_with_its_grain_map(d2served):
    calls = []
    req = Request("animals", "owl", "cfg", 2.0, 1.5, 4, "ddpm", 3, 2)
    chosen, family, status = generate_for(d2served, req, progress=lambda d, t: calls.append((d, t)))
    assert [c for _, c in chosen] == ["owl #1", "owl #1 · grain map", "owl #2", "owl #2 · grain map"]
    assert [c for _, c in family] == ["cat", "cat · grain map", "dog", "dog · grain map", "owl", "owl · grain map"]
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]                   # one report per DCT step
    assert status.startswith("5 images in") and "ddpm, 4 steps, cfg ×2 (grain maps ×1.5), seed 3" in status
    # the pictures are exactly the pipeline's images and grain maps for these labels and seed
    cfg, labels, _, _ = validate(d2served, req)
    images, grains = d2served.pipe(labels, steps="4", sampler="ddpm", cfg_scale=2.0, grain_cfg_scale=1.5, seed=3,
                                   progress=False)
    assert images.shape == (5, 1, D2_SIZE, D2_SIZE) and grains.shape == (5, D2_SIZE // D2_REGION, D2_SIZE // D2_REGION)
    pics, maps = (chosen + family)[0::2], (chosen + family)[1::2]
    for k, ((im, _), (mp, _)) in enumerate(zip(pics, maps)):
        assert im.size == (D2_SIZE, D2_SIZE) and im.mode == "L" and (np.asarray(im) == images[k, 0].numpy()).all()
        m = np.asarray(mp)                                               # (16, 16, 3): one colour per 4 px region
        assert mp.mode == "RGB" and m.shape == (D2_SIZE, D2_SIZE, 3)
        blocks = m.reshape(4, D2_REGION, 4, D2_REGION, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()                   # constant over each region
        fine = (blocks[:, 0, :, 0] == [230, 50, 50]).all(-1)            # red = fine, else blue = coarse
        assert (fine | (blocks[:, 0, :, 0] == [50, 90, 230]).all(-1)).all()
        assert (torch.from_numpy(fine).long() == grains[k]).all()
    assert 0 < grains.float().mean() < 1                                # both grains occur (random weights)
    # same seed -> same pixels; another seed -> other images and maps
    again, _, _ = generate_for(d2served, req)
    other, _, _ = generate_for(d2served, Request("animals", "owl", "cfg", 2.0, 1.5, 4, "ddpm", 4, 2))
    assert all((np.asarray(a) == np.asarray(b)).all() for (a, _), (b, _) in zip(chosen, again))
    assert not (np.asarray(chosen[0][0]) == np.asarray(other[0][0])).all()


def test_d2it_every_offered_sampler_runs(d2served):
    for name in d2served.samplers():
        chosen, _, status = generate_for(d2served, Request("vehicles", "car", "cfg", 1.5, 1.5, 3, name, 0, 1))
        assert chosen[0][0].size == (D2_SIZE, D2_SIZE) and f"{name}, 3 steps" in status


# ---- the page in a real browser ----------------------------------------------------------------------------
def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"browser test skipped: {', '.join(missing)} missing (Debian packages chromium and "
                    "chromium-driver; `make browser` installs them)")
    for mod, extra in (("selenium", "test"), ("gradio", "web")):
        try:
            __import__(mod)
        except ImportError:
            pytest.skip(f"browser test skipped: {mod} is not installed (pip install 'efdit[{extra}]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]))
    return out


@pytest.fixture
def server(ckpt):
    """`efdit serve --ckpt CKPT --port PORT` in a background thread of this process (one torch import, not two)."""
    _browser_or_skip()
    from efdit.commands.serve import serve
    port = _free_port()
    app = serve(ckpt=str(ckpt), port=port, device="cpu", block=False)
    yield f"http://127.0.0.1:{port}/", port
    app.close()


def _chrome(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1150", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own pandas-3 deprecations
def test_page_generates_in_chromium(server, served, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    url, port = server
    assert _listen_addresses(port) == {"127.0.0.1"}  # loopback only unless --host says otherwise
    d = _chrome(tmp_path)
    try:
        wait = WebDriverWait(d, 40)
        d.get(url)
        field = lambda eid: d.find_element(By.CSS_SELECTOR, f"#{eid} input")  # noqa: E731
        status = lambda: d.find_element(By.ID, "status").text  # noqa: E731
        wait.until(lambda _: field("superclass").get_property("value") == "animals")
        assert field("subclass").get_property("value") == "cat"
        if extra_sample_options():  # shown for a DiT (hidden for D²iT runs, see below)
            opts = d.find_elements(By.XPATH, "//*[contains(text(), 'HRIG / acceleration')]")
            assert any(e.is_displayed() for e in opts)

        def pick(eid, value, expect_options):
            box = field(eid)
            box.click()
            listbox = box.get_attribute("aria-controls")
            items = wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, f"[id='{listbox}'] li"))
            assert [i.text.replace("✓", "").strip() for i in items] == expect_options
            next(i for i in items if i.text.replace("✓", "").strip() == value).click()
            wait.until(lambda _: field(eid).get_property("value") == value)

        pick("superclass", "vehicles", ["animals", "vehicles"])
        wait.until(lambda _: field("subclass").get_property("value") == "car")  # the list followed the superclass
        pick("subclass", "bus", ["car", "bus"])
        d.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda _: "images in" in status())
        imgs = d.find_elements(By.CSS_SELECTOR, "#samples img")
        sibs = d.find_elements(By.CSS_SELECTOR, "#siblings img")
        assert len(imgs) == 4 and [s.get_attribute("alt") for s in sibs] == ["car", "bus"]
        shown = []
        for img in imgs + sibs:
            pic = Image.open(io.BytesIO(urllib.request.urlopen(img.get_attribute("src"), timeout=10).read()))
            assert pic.size == (W, H) and pic.mode == "L"
            assert img.get_property("naturalWidth") == W and img.get_property("naturalHeight") == H
            shown.append(np.asarray(pic))
        # the page shows exactly what the library samples for the same request (defaults: cfg ×3, 4 steps, seed 0)
        want, fam, _ = generate_for(served, Request("vehicles", "bus", "auto", 3.0, 1.0, 4, "ddim", 0, 4))
        assert all((a == np.asarray(b)).all() for a, (b, _) in zip(shown, want + fam))
        shot = tmp_path / "web.png"
        d.save_screenshot(str(shot))
        if os.environ.get("EFDIT_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["EFDIT_SCREENSHOT_DIR"]) / "web.png")
        assert Image.open(shot).size[0] > 0

        # bad input: a readable line in the page, no traceback, the server still answers
        scale = field("scale")
        scale.send_keys(Keys.CONTROL, "a")
        scale.send_keys("50", Keys.TAB)
        d.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda _: "guidance scale must be between 0 and 20, not 50" in status())
        sub = field("subclass")
        sub.send_keys(Keys.CONTROL, "a")
        sub.send_keys("buss", Keys.TAB)
        scale.send_keys(Keys.CONTROL, "a")
        scale.send_keys("2", Keys.TAB)
        d.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda _: "unknown subclass 'buss'; did you mean 'bus'?" in status())
        assert "Traceback" not in d.page_source
        d.save_screenshot(str(tmp_path / "web-error.png"))
        if os.environ.get("EFDIT_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "web-error.png", Path(os.environ["EFDIT_SCREENSHOT_DIR"]) / "web-error.png")
        assert len(d.find_elements(By.CSS_SELECTOR, "#samples img")) == 4  # the last good images stay
    finally:
        d.quit()


@pytest.fixture
def d2server(d2run):
    _browser_or_skip()
    from efdit.commands.serve import serve
    port = _free_port()
    app = serve(run=str(d2run), port=port, device="cpu", block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
def test_d2it_page_shows_image_and_grain_map_pairs(d2server, d2served, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    d = _chrome(tmp_path)
    try:
        wait = WebDriverWait(d, 40)
        d.get(d2server)
        field = lambda eid: d.find_element(By.CSS_SELECTOR, f"#{eid} input")  # noqa: E731
        wait.until(lambda _: field("superclass").get_property("value") == "animals")
        assert "D²iT run" in d.find_element(By.ID, "model-info").text
        assert "grain-map scale (DGT)" in d.find_element(By.ID, "scale-super").text
        hidden = d.find_elements(By.XPATH, "//*[contains(text(), 'HRIG / acceleration')]")
        assert not any(e.is_displayed() for e in hidden)              # options D²iT lacks are hidden
        d.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda _: "images in" in d.find_element(By.ID, "status").text)
        imgs = d.find_elements(By.CSS_SELECTOR, "#samples img")
        alts = [i.get_attribute("alt") for i in imgs]
        assert alts == [a for k in range(1, 5) for a in (f"cat #{k}", f"cat #{k} · grain map")]
        pics = [Image.open(io.BytesIO(urllib.request.urlopen(i.get_attribute("src"), timeout=10).read()))
                for i in imgs]
        assert [(p.size, p.mode) for p in pics] == [((D2_SIZE, D2_SIZE), "L"), ((D2_SIZE, D2_SIZE), "RGB")] * 4
        want, _, _ = generate_for(d2served, Request("animals", "cat", "cfg", 2.0, 1.5, 4, "ddpm", 0, 4))
        assert all((np.asarray(a) == np.asarray(b)).all() for a, (b, _) in zip(pics, want))
        d.save_screenshot(str(tmp_path / "web-d2it.png"))
        if os.environ.get("EFDIT_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "web-d2it.png", Path(os.environ["EFDIT_SCREENSHOT_DIR"]) / "web-d2it.png")
    finally:
        d.quit()
