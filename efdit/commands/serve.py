"""`efdit serve`: a local web page (Gradio) to browse a model's hierarchy and sample it.

Pick a superclass, then one of its subclasses (the lists come from the hierarchy saved in the checkpoint),
set guidance, steps, sampler, seed and the HRIG / acceleration options the installed efdit knows, and
Generate: the chosen class's samples, and one sample of every subclass of the superclass side by side.
The sampling controls start at the model's default setting (`efdit.engine.fast_sampling`: its fastest
quality-matched setting when the model file records one, else the documented rule or its config's), the model line
says which and why, and the status line after each run names the exact settings used.

D²iT run folders are served too (`efdit.commands.serve_d2it.D2iTServed`): each image is shown beside its grain map,
and the options D²iT lacks (HRIG, block caches) are hidden.

Everything that decides what is sampled lives in plain functions (`ServedModel`, `validate`, `generate_for`)
so that it is testable without a browser; `build_app` only wires them to Gradio widgets. Bad input becomes a
one-line message in the page's status box, never a traceback. Gradio is imported only here, lazily
(`pip install efdit[web]`).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..config import SampleConfig, apply_overrides
from ..diffusion.hooks.cache import ACCEL
from ..diffusion.samplers import SAMPLERS
from ..diffusion.solvers import DETERMINISTIC
from ..engine.build import apply_attention, build_diffusion
from ..engine.fast_sampling import choose_sampling, describe_settings
from ..engine.files import is_d2it, is_d2it_run, load_model, read_metadata
from ..engine.generate import StepProgress, generate
from ..engine.paths import model_file
from ..errors import EfditError
from ..models.dit import resolve_device
from .options import Parser, port

MAX_SCALE = 20.0      # guidance scales outside [0, MAX_SCALE] are refused
MAX_IMAGES = 16       # images of the chosen class per request
LOOPBACK = ("127.0.0.1", "localhost", "::1")
GUIDANCE_MODES = ("auto", "none", "cfg", "super", "two_term")
EXTRA_SAMPLE_FIELDS = ("hrig", "accel", "accel_kwargs", "guidance_interval")  # shown when SampleConfig has them
SCALE_SUPER_LABEL = "superclass scale (two_term)"
CSS = "#samples img, #siblings img { image-rendering: pixelated; object-fit: contain !important; }"


# ---- the model behind the page ------------------------------------------------------------------------------
def find_checkpoint(run: str | os.PathLike | None = None, ckpt: str | os.PathLike | None = None) -> Path:
    """The model file of `--ckpt FILE` or of `--run DIR` (paths.model_file); a D²iT run folder is returned as the
    folder (`open_model` serves it)."""
    if ckpt:
        path = Path(ckpt)
        if path.is_dir():
            raise EfditError(f"--ckpt {path} is a folder: give the model file, or use --run {path}")
        if not path.is_file():
            raise EfditError(f"checkpoint not found: {path}")
        return path
    if not run:
        raise EfditError("no checkpoint: give --run RUN_DIR or --ckpt FILE")
    run = Path(run)
    if run.is_dir() and is_d2it_run(run):
        return run
    return model_file(run)


def available_samplers() -> list[str]:
    """The samplers efdit has (ddpm, ddim, dpmpp2m, …), as the page offers them."""
    return list(SAMPLERS)


def extra_sample_options() -> dict[str, object]:
    """The HRIG / acceleration fields of SampleConfig -> their defaults."""
    return {f.name: getattr(SampleConfig(), f.name) for f in fields(SampleConfig) if f.name in EXTRA_SAMPLE_FIELDS}


def accel_choices() -> list[str]:
    """The block caches (none, fora, …)."""
    return ["none", *ACCEL]


def _default_steps(spec: str) -> int:
    digits = "".join(c for c in str(spec) if c.isdigit())
    return int(digits) if digits else 50


class ServedModel:
    """A loaded model file: the model, its config and hierarchy, and what the page offers for it."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = Path(path)
        meta = read_metadata(self.path)
        if is_d2it(meta):  # open_model serves the run folder of a stage file
            raise EfditError(f"{self.path} is a D²iT stage file outside a D²iT run folder (no config.json "
                             f"beside it): serve the run folder `efdit d2it train` wrote")
        self.model, self.cfg, self.hierarchy, self.meta = load_model(self.path, device)
        self.sampling = choose_sampling(self.cfg, self.meta)  # the default setting the controls start at
        self.backend, self.d2it = None, False
        self.device = device
        self.lock = threading.Lock()  # one sampling run at a time on this model

    @property
    def label_space(self) -> str:
        return self.cfg.model.condition_on

    @property
    def max_steps(self) -> int:
        return self.cfg.diffusion.steps

    def samplers(self) -> list[str]:
        return available_samplers()

    def defaults(self) -> dict:
        s, modes, setting = self.cfg.sample, self.guidance_modes(), self.sampling.setting
        return {"guidance": s.guidance if s.guidance in modes else "auto", "scale": s.cfg_scale,
                "scale_super": s.cfg_scale_super, "steps": min(_default_steps(setting["steps"]), self.max_steps),
                "sampler": setting["sampler"]}

    def default_extras(self) -> dict:
        """Start values of the HRIG / acceleration fields: the config's HRIG, the default setting's cache and
        guidance interval."""
        setting = self.sampling.setting
        values = {"hrig": self.cfg.sample.hrig, "accel": setting["accel"], "accel_kwargs": setting["accel_kwargs"],
                  "guidance_interval": setting["guidance_interval"]}
        return {k: values.get(k, v) for k, v in extra_sample_options().items()}

    def sampling_note(self) -> str:
        """The default setting and why (the page's model line)."""
        s = self.sampling.setting
        text = f"{s['sampler']} {s['steps']} steps"
        if s["accel"] not in ("", "none"):
            text += f" + {s['accel']} {s['accel_kwargs']}".rstrip()
        if s["guidance_interval"]:
            text += f", guided for t in [{s['guidance_interval'].replace(',', ', ')}]"
        return f"default sampling: {text} — {self.sampling.note()}"

    def guidance_modes(self) -> list[str]:
        emb = getattr(self.model, "y_embedder", None) if self.model is not None else None
        has_null = bool(getattr(emb, "has_null", True))
        tiered = type(emb).__name__ == "TieredEmbedder"
        modes = ["auto", "none"] + (["cfg"] if has_null else []) + (["super"] if tiered else [])
        return modes + (["two_term"] if tiered and has_null else [])

    def subclasses_of(self, superclass: str) -> list[str]:
        sup = self.hierarchy.super_id(superclass)
        return [self.hierarchy.sub_names[i] for i in self.hierarchy.children(sup)]

    def describe(self) -> str:
        h, cfg = self.hierarchy, self.cfg
        size = "x".join(str(s) for s in self.meta.get("input_size", []))
        kind = "D²iT" if self.d2it else f"DiT ({cfg.model.embedder} embedder, conditioned on {self.label_space}classes)"
        text = (f"**{self.path.name}** — {kind}, {size} px × {self.meta.get('channels', '?')} channels, "
                f"{h.num_sub} subclasses under {h.num_super} superclasses")
        return text if self.d2it else f"{text}<br>{self.sampling_note()}"


def open_model(path: str | os.PathLike, device: str = "cpu"):
    """A model file -> ServedModel; a D²iT run folder (or one of its stage files) -> D2iTServed."""
    path = Path(path)
    if path.is_file() and is_d2it(read_metadata(path)) and (path.parent / "config.json").is_file():
        path = path.parent
    if path.is_dir() and is_d2it_run(path):
        from .serve_d2it import D2iTServed
        return D2iTServed(path, device)
    return ServedModel(path, device)


# ---- one request -------------------------------------------------------------------------------------------
@dataclass
class Request:
    superclass: str
    subclass: str
    guidance: str = "auto"
    scale: float = 2.0
    scale_super: float = 1.0
    steps: int = 50
    sampler: str = "ddim"
    seed: int = 0
    n: int = 4
    extras: dict = field(default_factory=dict)  # sample.hrig / sample.accel values


def validate(served, req: Request):
    """-> (config for this request, labels (N,), captions, number of images of the chosen class).

    Every refusal is an EfditError with a message meant for the page."""
    import copy
    if served is None:
        raise EfditError("no checkpoint loaded: start with `efdit serve --run RUN_DIR` (or --ckpt FILE), "
                         "or load a model file below")
    h = served.hierarchy
    if not req.superclass:
        raise EfditError("pick a superclass first")
    sup = h.super_id(str(req.superclass).strip())
    sub = None
    if served.label_space == "sub":
        if not req.subclass:
            raise EfditError("pick a subclass")
        sub = h.sub_id(str(req.subclass).strip())
        if int(h.parent[sub]) != sup:
            raise EfditError(f"subclass {h.sub_names[sub]!r} is not under superclass {h.super_names[sup]!r} "
                             f"(it is under {h.super_names[int(h.parent[sub])]!r})")
    modes = served.guidance_modes()
    if req.guidance not in modes:
        raise EfditError(f"guidance {req.guidance!r} is not available for this model (choose {', '.join(modes)})")
    for name, value in (("guidance scale", req.scale), ("superclass guidance scale", req.scale_super)):
        if value is None or not (0.0 <= float(value) <= MAX_SCALE):
            raise EfditError(f"{name} must be between 0 and {MAX_SCALE:g}, not {value}")
    max_steps = served.max_steps
    if req.steps is None or int(req.steps) != req.steps or not 1 <= int(req.steps) <= max_steps:
        raise EfditError(f"steps must be a whole number from 1 to {max_steps}, not {req.steps}")
    samplers = served.samplers()
    if req.sampler not in samplers:
        raise EfditError(f"sampler {req.sampler!r} is unknown (choose {', '.join(samplers)})")
    if req.seed is None or int(req.seed) != req.seed or not 0 <= int(req.seed) < 2 ** 63:
        raise EfditError(f"seed must be a whole number ≥ 0, not {req.seed}")
    if req.n is None or not 1 <= int(req.n) <= MAX_IMAGES:
        raise EfditError(f"number of images must be from 1 to {MAX_IMAGES}, not {req.n}")

    if served.d2it:
        cfg = served.configure(req)  # D²iT: its own sample config (DCT and DGT guidance, steps, sampler, seed)
        n = int(req.n)
        family = h.children(sup)
        labels = torch.tensor([sub] * n + family, dtype=torch.long)
        return cfg, labels, [f"{h.sub_names[sub]} #{i + 1}" for i in range(n)] + [h.sub_names[c] for c in family], n
    cfg = copy.deepcopy(served.cfg)
    ov = {"sample.guidance": req.guidance, "sample.cfg_scale": float(req.scale),
          "sample.cfg_scale_super": float(req.scale_super), "sample.steps": str(int(req.steps)),
          "sample.sampler": req.sampler, "sample.seed": int(req.seed)}
    known = extra_sample_options()
    for k, v in (req.extras or {}).items():
        if k not in known:
            raise EfditError(f"option {k!r} is not available in this efdit")
        ov[f"sample.{k}"] = v
    if req.sampler in DETERMINISTIC:
        ov["sample.eta"] = 0.0  # a deterministic solver; the page has no η control
    apply_overrides(cfg, ov)

    n = int(req.n)
    if served.label_space == "sub":
        chosen, family = [sub] * n, h.children(sup)
        names = h.sub_names
    else:  # a superclass-conditioned model (e.g. the shipped base): the superclasses side by side
        chosen, family = [sup] * n, list(range(h.num_super))
        names = h.super_names
    labels = torch.tensor(chosen + family, dtype=torch.long)
    captions = [f"{names[chosen[0]]} #{i + 1}" for i in range(n)] + [names[c] for c in family]
    return cfg, labels, captions, n


def generate_for(served, req: Request, progress=None):
    """-> (images of the chosen class, one image per sibling class, status line); images as (PIL, caption).

    D²iT models also give grain maps: each image is followed by its map."""
    cfg, labels, captions, n = validate(served, req)
    t0 = time.time()
    with served.lock:
        if served.d2it:
            images, grains = served.backend.generate(labels, cfg, progress=progress)
        else:
            apply_attention(served.model, cfg)
            total = build_diffusion(cfg, cfg.sample.steps).num_timesteps
            hooks = [StepProgress(total, progress)] if progress is not None else []
            try:
                images = generate(served.model, cfg, labels, device=served.device, progress=False, hooks=hooks)
            except ValueError as e:  # bad sampler options surface as ValueError from the library
                raise EfditError(str(e)) from None
            grains = None
    pics = [_to_pil(im) for im in images]
    items = list(zip(pics, captions))
    if grains is not None:
        maps = [_to_pil(m) for m in grain_map_images(grains, images.shape[-1])]
        items = [x for pair in zip(items, ((m, f"{c} · grain map") for m, c in zip(maps, captions))) for x in pair]
        chosen, family = items[:2 * n], items[2 * n:]
    else:
        chosen, family = items[:n], items[n:]
    took = f"{len(labels)} images in {time.time() - t0:.1f} s · "
    if served.d2it:
        return chosen, family, took + served.status(cfg, grains)
    return chosen, family, took + settings_used(served, cfg)


def settings_used(served, cfg) -> str:
    """The status line's account of a DiT request: the exact settings in the words `efdit sample` prints
    (engine.fast_sampling.describe_settings), and a note when they are the model's default setting."""
    text = describe_settings(cfg)
    sampling = getattr(served, "sampling", None)
    if sampling is not None and sampling.source in ("recorded", "rule") and sampling.matches(cfg):
        text += " (the model's fastest quality-matched setting)" if sampling.source == "recorded" else \
            " (efdit's default rule: DPM-Solver++(2M), 10 steps)"
    return text


def grain_map_images(maps: torch.Tensor, size: int) -> torch.Tensor:
    """D²iT grain maps (N, h, w) in {0: coarse, 1: fine} -> uint8 RGB (N, 3, size, size): red fine, blue coarse."""
    m = torch.nn.functional.interpolate(maps[:, None].float(), size=(size, size), mode="nearest")
    red = torch.tensor([230.0, 50, 50]).view(1, 3, 1, 1)
    blue = torch.tensor([50.0, 90, 230]).view(1, 3, 1, 1)
    return (m * red + (1 - m) * blue).round().to(torch.uint8)


def _to_pil(im: torch.Tensor):
    from PIL import Image
    arr = im.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


# ---- the page ----------------------------------------------------------------------------------------------
def _error_text(e: BaseException) -> str:
    if isinstance(e, EfditError):
        return f"⚠️ {e}"
    print(f"efdit serve: unexpected error\n{''.join(traceback.format_exception(e))}", file=sys.stderr)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"⚠️ internal error ({type(e).__name__}{': ' + first if first else ''}); details are in the server log"


def build_app(served, device: str = "cpu", allow_load: bool = True):
    """The Gradio Blocks app. `allow_load`: show a field to load another model file (loopback servers only)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    state = {"served": served}
    samplers = available_samplers()
    extras = extra_sample_options()

    def controls_for(sv):
        """Widget updates that follow the loaded model (a D²iT run: grain-map guidance, no HRIG / caches)."""
        if sv is None:
            return (gr.update(choices=[], value=None), gr.update(choices=[], value=None),
                    gr.update(choices=list(GUIDANCE_MODES), value="auto"), gr.update(), gr.update(), gr.update(),
                    gr.update(), gr.update(), "No model loaded.", *[gr.update() for _ in extras])
        h, dflt, offered = sv.hierarchy, sv.defaults(), sv.samplers()
        start = sv.default_extras() if hasattr(sv, "default_extras") else {}
        sup0 = h.super_names[0] if h.num_super else None
        subs = sv.subclasses_of(sup0) if sup0 is not None else []
        return (gr.update(choices=h.super_names, value=sup0),
                gr.update(choices=subs, value=subs[0] if subs else None, interactive=sv.label_space == "sub"),
                gr.update(choices=sv.guidance_modes(), value=dflt["guidance"]),
                gr.update(value=min(max(dflt["scale"], 0.0), MAX_SCALE)),
                gr.update(value=min(max(dflt["scale_super"], 0.0), MAX_SCALE),
                          label="grain-map scale (DGT)" if sv.d2it else SCALE_SUPER_LABEL),
                gr.update(maximum=sv.max_steps, value=dflt["steps"]),
                gr.update(choices=offered, value=dflt["sampler"] if dflt["sampler"] in offered else offered[0]),
                gr.update(visible=bool(extras) and not sv.d2it),
                sv.describe() + ("" if sv.label_space == "sub" else
                                 " — conditioned on superclasses only: the subclass list is for browsing"),
                *[gr.update(value=str(start[k])) if k in start else gr.update() for k in extras])

    with gr.Blocks(title="efdit", analytics_enabled=False) as app:
        gr.Markdown("# efdit — hierarchy-aware generation\nPick a superclass, then one of its subclasses, "
                    "and Generate. The lower gallery shows one sample of every subclass of the superclass.")
        info = gr.Markdown(elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                sup = gr.Dropdown(label="superclass", choices=[], allow_custom_value=True, elem_id="superclass")
                sub = gr.Dropdown(label="subclass", choices=[], allow_custom_value=True, elem_id="subclass")
                with gr.Row():
                    guidance = gr.Dropdown(label="guidance", choices=list(GUIDANCE_MODES), value="auto",
                                           elem_id="guidance")
                    scale = gr.Number(label=f"guidance scale (0–{MAX_SCALE:g})", value=2.0, elem_id="scale")
                    scale_super = gr.Number(label=SCALE_SUPER_LABEL, value=1.0, elem_id="scale-super")
                steps = gr.Slider(1, 1000, value=50, step=1, label="steps", elem_id="steps")
                with gr.Row():
                    sampler = gr.Radio(samplers, value="ddim", label="sampler", elem_id="sampler")
                    seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
                    n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="images", elem_id="n")
                extra_boxes = []
                with gr.Accordion("HRIG / acceleration", open=False, visible=bool(extras)) as options:
                    for k, default in extras.items():
                        if k == "accel":
                            box = gr.Dropdown(accel_choices(), value=str(default), label="sample.accel "
                                              "(training-free block cache)", elem_id=f"opt-{k}")
                        else:
                            box = gr.Textbox(label=f"sample.{k}", value=str(default), elem_id=f"opt-{k}",
                                             placeholder="empty = off")
                        extra_boxes.append(box)
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("", elem_id="status")
                with gr.Accordion("model file", open=served is None):
                    path_box = gr.Textbox(label="model file or run folder", interactive=allow_load,
                                          value=str(served.path) if served else "", elem_id="model-path",
                                          placeholder="runs/demo" if allow_load else "loading is off on a "
                                                                                      "non-loopback server")
                    load = gr.Button("Load", interactive=allow_load, elem_id="load")
            with gr.Column(scale=2):
                chosen = gr.Gallery(label="samples of the chosen class", columns=4, height=340, format="png",
                                    object_fit="contain", elem_id="samples")
                family = gr.Gallery(label="the superclass's subclasses, side by side", columns=6, height=260,
                                    format="png", object_fit="contain", fit_columns=False, elem_id="siblings")

        model_outputs = [sup, sub, guidance, scale, scale_super, steps, sampler, options, info, *extra_boxes]

        def on_start():
            return controls_for(state["served"])

        def on_superclass(value):
            sv = state["served"]
            if sv is None or not value:
                return gr.update(choices=[], value=None), ""
            try:
                subs = sv.subclasses_of(str(value).strip())
            except EfditError as e:
                return gr.update(choices=[], value=None), _error_text(e)
            return gr.update(choices=subs, value=subs[0] if subs else None), gr.update()  # keep the status

        def on_load(text):
            try:
                if not allow_load:
                    raise EfditError("loading model files from the page is off on a non-loopback server")
                path = find_checkpoint(run=text.strip()) if text and text.strip() else find_checkpoint()
                state["served"] = open_model(path, device)
            except Exception as e:  # noqa: BLE001 -- every failure becomes a line in the page
                return (*[gr.update() for _ in model_outputs], _error_text(e))
            return (*controls_for(state["served"]), f"loaded {path}")

        def on_generate(sup_v, sub_v, guid_v, scale_v, scale_super_v, steps_v, sampler_v, seed_v, n_v, *extra_v,
                        progress=gr.Progress()):
            try:
                sv = state["served"]
                opts = {} if sv is not None and sv.d2it else dict(zip(extras, extra_v))  # hidden for D²iT
                req = Request(sup_v or "", sub_v or "", guid_v or "auto", scale_v, scale_super_v,
                              steps_v, sampler_v or "", seed_v, n_v, opts)
                progress(0, desc="sampling")
                cb = (lambda done, total: progress((done, total), desc="sampling", unit="steps"))
                a, b, msg = generate_for(state["served"], req, progress=cb)
                return a, b, msg
            except Exception as e:  # noqa: BLE001 -- every failure becomes a line in the page
                return gr.update(), gr.update(), _error_text(e)

        app.load(on_start, None, model_outputs, queue=False)
        sup.change(on_superclass, sup, [sub, status], queue=False)
        load.click(on_load, path_box, [*model_outputs, status], concurrency_limit=1)
        go.click(on_generate, [sup, sub, guidance, scale, scale_super, steps, sampler, seed, n, *extra_boxes],
                 [chosen, family, status], concurrency_limit=1, show_progress="full")
    return app


def serve(run: str | None = None, ckpt: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          device: str | None = None, block: bool = True):
    """Load the model (if given) and start the server. Returns the Gradio app (running in the background when
    `block` is False)."""
    import importlib.util
    path = find_checkpoint(run, ckpt) if (run or ckpt) else None
    if importlib.util.find_spec("gradio") is None:
        raise EfditError("the web page needs Gradio: pip install 'efdit[web]'")
    device = str(resolve_device(device or os.environ.get("EFDIT_DEVICE", "auto")))
    served = open_model(path, device) if path else None
    loopback = host in LOOPBACK
    app = build_app(served, device, allow_load=loopback)
    app.queue(default_concurrency_limit=1, max_size=64)
    if not loopback:
        print(f"efdit serve: listening on {host}: the page is reachable from other machines", file=sys.stderr)
    print(f"efdit serve: {served.path if served else 'no model loaded'} on http://{host}:{port} ({device})",
          flush=True)
    app.launch(server_name=host, server_port=port, show_error=False, quiet=True, prevent_thread_lock=not block,
               inbrowser=False, share=False, css=CSS, footer_links=[])
    return app


def main(argv: list[str]) -> int:
    p = Parser(prog="efdit serve", description="A local web page to browse a model's hierarchy "
                                "and sample it (needs efdit[web]).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help="a run folder holding model.safetensors (e.g. runs/demo), or a D²iT run "
                     "folder (dvae/dgt/dct .safetensors, from `efdit d2it train`)")
    src.add_argument("--ckpt", help="an efdit model file (.safetensors)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    p.add_argument("--port", type=port, default=7860)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="auto | cpu | cuda (default: $EFDIT_DEVICE or auto)")
    args = p.parse_args(argv)
    serve(args.run, args.ckpt, args.host, args.port, args.device, block=True)
    return 0
