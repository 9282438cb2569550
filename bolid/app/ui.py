"""The Gradio page of ``bolid app``: references in, what BoLID reads shown, images and Body Sim out.

Every event handler calls :class:`bolid.app.engine.AppEngine` and turns any failure into a message on the
page (never a stack trace; the traceback goes to the server log). The two events that use the model (new
references, generate) share one queue slot (``concurrency_id="model"``, limit 1), and the engine's lock
serialises model work for any other caller too. Gradio's analytics are off
(``GRADIO_ANALYTICS_ENABLED=False`` unless set otherwise), no share link is made unless asked for, the
theme uses local fonts only, and server-side rendering (a Node process) is off, so the page works offline.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import gradio as gr
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("bolid app needs Gradio: pip install 'bolid[app]'") from e

from bolid.app.draw import shape_chart, shape_rows
from bolid.app.engine import AppEngine, AppError, GenerationRequest
from bolid.images import ImageError
from bolid.pipeline import BASE_GUIDANCE, BASE_STEPS, LIGHTNING_STEPS
from bolid.reference import NoPersonError

log = logging.getLogger(__name__)

CSS = """
#ref-status, #gen-status {min-height: 1.5em}
#command textarea {font-family: ui-monospace, monospace; font-size: 12px}
#overlays .thumbnail-item {aspect-ratio: 3 / 2}
"""
INTRO = """# BoLID: identity that keeps the body
Upload one or more photos of **one person** (or click the example), check what BoLID reads in each
(green: the person it uses; yellow/red: the 17 keypoints; orange: the face box), type a prompt, set how
strongly the face (λ_face) and the body (λ_body) steer the image, and generate."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from bolid.adapter import AdapterShapeError
    from bolid.components import MissingWeightsError

    return AppError, ImageError, NoPersonError, MissingWeightsError, AdapterShapeError, FileNotFoundError, ValueError


def _message(e: BaseException) -> str:
    if isinstance(e, _user_errors()):
        return f"**Error:** {e}"
    log.exception("app: unexpected error")
    return f"**Internal error** ({type(e).__name__}: {e}). The server log has the details."


def _paths(files) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, (list, tuple)) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


class Page:
    """The handlers of the page, bound to one engine."""

    def __init__(self, engine: AppEngine):
        self.engine = engine

    def references(self, files, progress=gr.Progress()):  # noqa: B008 - Gradio finds the tracker in the default
        """Uploads changed: overlays, shape chart, one line per photo, and the usable photos for generation."""
        paths = _paths(files)
        if not paths:
            return [], None, "", []
        progress(0.0, desc=f"finding the person in {len(paths)} photo(s)")
        try:
            views = self.engine.inspect(paths)
        except Exception as e:  # noqa: BLE001 - shown on the page
            return [], None, _message(e), []
        usable = [v for v in views if v.usable]
        lines = [("- " if v.usable and not v.warnings else "- ⚠ ") + v.summary() for v in views]
        if not usable:
            lines.append("\n**No usable photo yet**: upload a photo in which the person is clearly visible.")
        chart = shape_chart(shape_rows([v.reference for v in usable]))
        state = [{"path": v.path, "name": v.name} for v in usable]
        return [(v.overlay, v.name) for v in usable], chart, "\n".join(lines), state

    def generate(
        self,
        state,
        prompt,
        negative,
        face,
        body,
        steps,
        guidance,
        seed,
        num_images,
        width,
        height,
        lightning,
        compare,
        adapter,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio finds the progress tracker in the default
    ):
        """Generate button: gallery, Body Sim table, files to download, the equivalent command, a status line."""
        keep = gr.update()
        if not state:
            return keep, keep, keep, keep, "**Error:** no usable reference photo: upload a photo of the person first"
        request = GenerationRequest(
            prompt=prompt or "",
            negative_prompt=negative or None,
            scale_face=float(face),
            scale_body=float(body),
            steps=int(steps),
            guidance=float(guidance),
            seed=int(seed),
            num_images=int(num_images),
            width=int(width),
            height=int(height),
            lightning=bool(lightning),
            adapter=adapter.strip() or None,
            compare_base=bool(compare),
        )
        start = time.perf_counter()
        try:
            view = self.engine.generate(
                [s["path"] for s in state],
                request,
                progress=lambda f, d: progress(f, desc=d),
                names=[s["name"] for s in state],
            )
        except Exception as e:  # noqa: BLE001 - shown on the page
            return keep, keep, keep, keep, _message(e)
        headers = list(view.body_sim[0]) if view.body_sim else ["image", "Body Sim"]
        table = {"headers": headers, "data": [[_fmt(row[h]) for h in headers] for row in view.body_sim]}
        status = f"Generated {request.num_images} image(s) in {time.perf_counter() - start:.1f} s."
        if view.body_sim_note:
            status += f" {view.body_sim_note}"
        files = [str(f) for f in view.files]
        return view.images, table, files, view.command, status


def sampler_defaults(lightning: bool):
    """Steps and guidance that suit the UNet (Lightning: 4 steps, CFG off; base: 30 steps, CFG 5)."""
    return (
        (gr.update(value=LIGHTNING_STEPS), gr.update(value=0.0))
        if lightning
        else (gr.update(value=BASE_STEPS), gr.update(value=BASE_GUIDANCE))
    )


def build(engine: AppEngine, examples: Sequence[Path] = (), keep_s: int = 3600) -> gr.Blocks:
    """The page. ``examples``: bundled reference photos offered one click away."""
    page = Page(engine)
    pipe = engine.default_pipeline()
    native = pipe.sdxl.unet.config.sample_size * pipe.sdxl.vae_scale_factor
    step = max(16, native // 8)
    lightning = pipe.lightning
    with gr.Blocks(title="BoLID", analytics_enabled=False, delete_cache=(min(keep_s, 600), keep_s)) as demo:
        gr.Markdown(INTRO)
        usable = gr.State([])
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                refs = gr.File(label="Reference photos (one person)", file_count="multiple", elem_id="refs")
                if examples:
                    gr.Examples([[[str(p)]] for p in examples], inputs=[refs], label="Example photo")
                prompt = gr.Textbox(label="Prompt", value="a photo of a person walking on a beach", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt (used when guidance > 1)", elem_id="negative")
                face = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="λ_face (face term)", elem_id="lambda-face")
                body = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="λ_body (body term)", elem_id="lambda-body")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (image i uses seed + i)", elem_id="seed")
                    num = gr.Slider(1, engine.max_images, value=2, step=1, label="Images", elem_id="num-images")
                compare = gr.Checkbox(
                    value=True, label="Also show the base model's image (same seed, no identity)", elem_id="compare"
                )
                with gr.Accordion("Model and sampling", open=False):
                    use_lightning = gr.Checkbox(
                        value=lightning, label="SDXL-Lightning UNet (off: SDXL base UNet)", elem_id="lightning"
                    )
                    steps = gr.Slider(
                        1,
                        60,
                        value=LIGHTNING_STEPS if lightning else BASE_STEPS,
                        step=1,
                        label="Steps",
                        elem_id="steps",
                    )
                    guidance = gr.Slider(
                        0.0,
                        15.0,
                        value=0.0 if lightning else BASE_GUIDANCE,
                        step=0.5,
                        label="Guidance (CFG; 0 = off)",
                        elem_id="guidance",
                    )
                    with gr.Row():
                        width = gr.Slider(
                            step, min(4 * native, 2048), value=native, step=step, label="Width", elem_id="width"
                        )
                        height = gr.Slider(
                            step, min(4 * native, 2048), value=native, step=step, label="Height", elem_id="height"
                        )
                    adapter = gr.Textbox(
                        value=engine.model.adapter or "",
                        label="Adapter folder on the server (empty: a fresh, untrained adapter)",
                        elem_id="adapter",
                    )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3, min_width=360):
                ref_status = gr.Markdown(elem_id="ref-status")
                overlays = gr.Gallery(
                    label="What BoLID reads in each photo",
                    columns=3,
                    height="auto",
                    object_fit="contain",
                    elem_id="overlays",
                )
                chart = gr.Plot(label="Body shape", elem_id="shape")
                gen_status = gr.Markdown(elem_id="gen-status")
                gallery = gr.Gallery(
                    label="Generated (BoLID | base model, same seed)",
                    columns=2,
                    format="png",
                    elem_id="gallery",
                )
                bodysim = gr.Dataframe(
                    label="Body Sim vs the references (1 = same proportions; BlazePose keypoints)",
                    interactive=False,
                    elem_id="bodysim",
                )
                files = gr.File(
                    label="Downloads: images, settings.json, embeds.safetensors (as `bolid generate`)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
                command = gr.Textbox(
                    label="The same images from the command line", interactive=False, elem_id="command"
                )
        # Both model events share one queue slot: the page never runs two model calls at once.
        refs.change(
            page.references,
            [refs],
            [overlays, chart, ref_status, usable],
            concurrency_id="model",
        )
        use_lightning.change(sampler_defaults, [use_lightning], [steps, guidance])
        run.click(
            page.generate,
            [
                usable,
                prompt,
                negative,
                face,
                body,
                steps,
                guidance,
                seed,
                num,
                width,
                height,
                use_lightning,
                compare,
                adapter,
            ],
            [gallery, bodysim, files, command, gen_status],
            concurrency_id="model",
        )
    return demo


def launch(
    engine: AppEngine,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    max_upload_mb: int = 64,
    examples: Sequence[Path] = (),
    keep_s: int = 3600,
    block: bool = True,
):
    """Serve the page; with ``block=False`` return ``(demo, url)`` while it runs in a background thread."""
    demo = build(engine, examples, keep_s)
    demo.queue(default_concurrency_limit=1, max_size=64)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=False,
        max_file_size=f"{max_upload_mb}mb",
        allowed_paths=[str(Path(p).parent) for p in examples],
        ssr_mode=False,
        mcp_server=False,
        footer_links=[],
        theme=theme,
        css=CSS,
    )
    if not block:
        return demo, url
    try:
        demo.block_thread()
    finally:
        demo.close()
    return demo, url
