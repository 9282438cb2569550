"""The web app's work, without any web framework: read references, generate, score, write the files.

:class:`AppEngine` is what the Gradio page (:mod:`bolid.app.ui`) calls, and what the tests call directly.
It adds no second implementation of anything ``bolid generate`` does:

* the pipeline is built by :func:`bolid.cli.generate.build_pipeline` from the same model options;
* each reference photo goes through :func:`bolid.reference.load_references`, the code ``generate`` uses,
  one photo at a time so that one bad photo is reported and left out instead of failing the rest;
* a generation request becomes the argument list of the equivalent ``bolid generate`` command
  (:meth:`GenerationRequest.argv`), which ``generate``'s own parser and checks read, and
  :func:`bolid.cli.generate.generate_images` / :func:`~bolid.cli.generate.save_result` run and write it, so
  ``settings.json`` and ``embeds.safetensors`` are exactly the CLI's (``command`` is ``"app"`` and ``argv``
  the equivalent command, which reproduces the images);
* Body Sim is :func:`bolid.metrics.body_similarity` with the keypoints of :class:`bolid.metrics.BodySimilarity`'s
  pose model (BlazePose), as in ``bolid eval``.

Uploads are checked before decoding: the header must be readable and the image at most ``max_pixels``. The
base model's image for the same seed is the same pipeline with no identity (both scales 0). Every
generation writes into its own fresh folder under the engine's temporary folder; folders older than
``keep_s`` seconds are deleted at the next generation and the whole folder by :meth:`AppEngine.close`.
One lock serialises all model work (the adapter's scales are pipeline state).
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from bolid.app.draw import draw_reference
from bolid.cli import generate as generate_cli
from bolid.images import MAX_IMAGE_PIXELS, ImageError, image_size
from bolid.metrics import FAILURE_REASONS, BodySimilarity, body_similarity
from bolid.reference import NoPersonError, Reference, load_references

log = logging.getLogger(__name__)

#: Uploads with more pixels than this are refused before decoding: the project's one pixel cap (the pose model
#: sees ~1 MP anyway).
MAX_PIXELS = MAX_IMAGE_PIXELS
FAILURE_TEXT = {
    "no_body": "no body found in the generated image",
    "no_reference_body": "no body found in the reference",
    "too_few_features": "too few body proportions visible in both",
}

Progress = Callable[[float, str], None]


class AppError(ValueError):
    """A request the app cannot serve; the message is shown to the user as is."""


class _Parser(argparse.ArgumentParser):
    """``generate``'s parser, raising instead of printing usage and exiting."""

    def error(self, message: str):
        raise AppError(message)


@dataclass
class ReferenceView:
    """One uploaded photo: the reference found in it (``None`` if unusable), its overlay, and messages."""

    name: str
    path: str
    reference: Reference | None = None
    overlay: Image.Image | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.reference is not None

    def summary(self) -> str:
        if self.error:
            return f"{self.name}: {self.error}"
        ref = self.reference
        face = "face visible" if ref.face_visible else "no face"
        persons = "1 person" if ref.num_persons == 1 else f"{ref.num_persons} persons"
        return f"{self.name}: {persons}, {face}" + "".join(f"; {w}" for w in self.warnings)


@dataclass
class GenerationRequest:
    """What the page asks for; the field names follow ``bolid generate``'s options."""

    prompt: str
    negative_prompt: str | None = None
    scale_face: float = 1.0
    scale_body: float = 1.0
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    lightning: bool = True
    adapter: str | None = None
    compare_base: bool = False

    def argv(self, references: Sequence[str], model: argparse.Namespace) -> list[str]:
        """The arguments of the equivalent ``bolid generate`` command (``-o`` left to the caller)."""
        out = [f"--prompt={self.prompt}"]
        if self.negative_prompt:
            out.append(f"--negative-prompt={self.negative_prompt}")
        out += [f"--components={model.components}", f"--pose={model.pose}", f"--pose-threshold={model.pose_threshold}"]
        out += [f"--device={model.device}"] + ([f"--dtype={model.dtype}"] if model.dtype else [])
        if self.adapter:
            out.append(f"--adapter={self.adapter}")
        if not self.lightning:
            out.append("--no-lightning")
        for name in ("steps", "guidance", "scale_face", "scale_body", "seed", "num_images", "width", "height"):
            value = getattr(self, name)
            if value is not None:
                out.append(f"--{name.replace('_', '-')}={value}")
        return [*out, "--", *references]


@dataclass
class GenerationView:
    """Images with their labels, the Body Sim table, the written files and the equivalent CLI command."""

    images: list[tuple[Image.Image, str]]
    body_sim: list[dict]
    files: list[Path]
    command: str
    settings: dict
    body_sim_note: str | None = None


class AppEngine:
    """References in, images and Body Sim out; see the module docstring.

    Args:
        model: parsed :func:`bolid.cli.generate.add_model_arguments` options (kit, adapter, pose model, device).
        workdir: parent of the per-generation folders; default a new temporary folder, removed by :meth:`close`.
        max_pixels: largest upload accepted, in pixels.
        max_references: most photos used per generation.
        max_images: most images per generation.
        keep_s: generation folders older than this many seconds are deleted.
        body_sim: the Body Sim metric (its pose model scores the images); default :class:`BodySimilarity`.
    """

    def __init__(
        self,
        model: argparse.Namespace,
        workdir: str | Path | None = None,
        max_pixels: int = MAX_PIXELS,
        max_references: int = 8,
        max_images: int = 8,
        keep_s: float = 3600.0,
        body_sim: BodySimilarity | None = None,
    ):
        self.model = model
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="bolid-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.max_pixels = max_pixels
        self.max_references = max_references
        self.max_images = max_images
        self.keep_s = keep_s
        self._body_sim = body_sim
        self._pipe = None
        self._pipe_key: tuple | None = None
        self.lock = threading.RLock()

    # ------------------------------------------------------------------------------------------- models

    def pipeline(self, lightning: bool, adapter: str | None):
        """The pipeline for this UNet and adapter (``None``: a fresh one), rebuilt only when they change.

        One pipeline is kept in memory; its pose extractor is handed on to the next one.
        """
        adapter = adapter or None
        key = (lightning, adapter)
        with self.lock:
            if self._pipe_key != key:
                extractor = self._pipe.extractor if self._pipe is not None else None
                log.info(
                    "building the pipeline: components=%s lightning=%s adapter=%s",
                    self.model.components,
                    lightning,
                    adapter,
                )
                self._pipe = None  # free the old one before loading the new
                model = argparse.Namespace(**{**vars(self.model), "lightning": lightning, "adapter": adapter})
                pipe = generate_cli.build_pipeline(model, extractor=extractor)
                pipe.sdxl.set_progress_bar_config(disable=False, desc="sampling", leave=False)  # for the page
                self._pipe, self._pipe_key = pipe, key
            return self._pipe

    def default_pipeline(self):
        """The pipeline of the command-line options (``--no-lightning``, ``--adapter``)."""
        return self.pipeline(self.model.lightning, self.model.adapter)

    def current_pipeline(self):
        """The pipeline in memory, or the default one: for work that needs only its pose extractor."""
        with self.lock:
            return self._pipe if self._pipe is not None else self.default_pipeline()

    @property
    def body_sim(self) -> BodySimilarity:
        if self._body_sim is None:
            self._body_sim = BodySimilarity()
        return self._body_sim

    # --------------------------------------------------------------------------------------- references

    def check_upload(self, path: str | Path, name: str) -> None:
        """Refuse what is not an image, or too large, from the header alone; errors name ``name``."""
        path = Path(path)
        if not path.is_file():
            raise ImageError(f"{name}: file not found")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
        try:
            width, height = image_size(path, max_pixels=None)  # the cap below names the file and the limit
        except ImageError as e:
            raise ImageError(str(e).replace(str(path), name)) from None
        if width * height > self.max_pixels:
            raise ImageError(
                f"{name}: {width}x{height} is {width * height / 1e6:.0f} MP, over this app's limit of "
                f"{self.max_pixels / 1e6:.0f} MP; scale it down first"
            )

    def inspect(self, paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[ReferenceView]:
        """Find the person in each photo with the pipeline's pose model and draw what was found.

        A photo that is not a usable image, or shows no person, gets an ``error`` and no reference; several
        persons or no visible face give warnings (the largest person is used; a hidden face drops the face
        term). Never raises for a bad photo.
        """
        names = list(names) if names is not None else [Path(p).name for p in paths]
        if len(paths) > self.max_references:
            raise AppError(f"{len(paths)} photos given; at most {self.max_references} are used, remove some")
        views = []
        with self.lock:
            pipe = self.current_pipeline()
            for path, name in zip(paths, names, strict=True):
                views.append(self._inspect_one(pipe, str(path), name))
        return views

    def _inspect_one(self, pipe, path: str, name: str) -> ReferenceView:
        view = ReferenceView(name=name, path=path)
        try:
            self.check_upload(path, name)
            (ref,) = load_references([path], pipe.extractor, pipe.pose_threshold)
        except NoPersonError:
            view.error = (
                f"no person found (detection threshold {pipe.pose_threshold}); this photo is left out. "
                "Use a photo in which the whole person is clearly visible."
            )
            return view
        except ImageError as e:
            view.error = str(e).replace(path, name).removeprefix(f"{name}: ") + "; this photo is left out"
            return view
        ref.name = name
        view.reference = ref
        if ref.num_persons > 1:
            view.warnings.append(f"{ref.num_persons} persons found: the largest (green box) is used")
        if not ref.face_visible:
            view.warnings.append("face not visible: only the body term is used for this photo")
        view.overlay = draw_reference(ref)
        return view

    # --------------------------------------------------------------------------------------- generation

    def new_run_dir(self) -> Path:
        """A fresh folder for one generation's files, after deleting folders older than ``keep_s``."""
        now = time.time()
        for old in self.workdir.glob("run-*"):
            if now - old.stat().st_mtime > self.keep_s:
                shutil.rmtree(old, ignore_errors=True)
        out = self.workdir / f"run-{uuid.uuid4().hex}"
        out.mkdir()
        return out

    def parse_request(self, paths: Sequence[str], request: GenerationRequest) -> tuple[argparse.Namespace, list[str]]:
        """``bolid generate``'s parsed and checked arguments for this request, and the argument list itself."""
        if not paths:
            raise AppError("no usable reference photo: upload at least one photo of the person")
        if not request.prompt or not request.prompt.strip():
            raise AppError("the prompt is empty: describe the image to generate")
        if not 1 <= request.num_images <= self.max_images:
            raise AppError(f"number of images must be 1..{self.max_images}, got {request.num_images}")
        argv = request.argv(paths, self.model)
        parser = _Parser(prog="bolid generate", exit_on_error=False)
        generate_cli.add_arguments(parser)
        try:
            args = parser.parse_args(argv)
            generate_cli.check_args(args)
        except (argparse.ArgumentError, ValueError, FileNotFoundError) as e:
            raise AppError(str(e)) from None
        return args, argv

    def generate(
        self,
        paths: Sequence[str],
        request: GenerationRequest,
        progress: Progress | None = None,
        names: Sequence[str] | None = None,
    ) -> GenerationView:
        """Generate as ``bolid generate`` would from these photos, plus the base images and Body Sim.

        Raises:
            AppError: an invalid request (the message says which input).
            bolid.reference.NoPersonError, bolid.images.ImageError: a photo went bad since it was inspected.
        """
        progress = progress or (lambda frac, desc: None)
        args, argv = self.parse_request(paths, request)
        with self.lock:
            progress(0.0, "loading the model")
            pipe = self.pipeline(args.lightning, args.adapter)
            progress(0.1, "reading the references and generating")
            result = generate_cli.generate_images(pipe, args)
            images = [(im, f"BoLID, seed {s}") for im, s in zip(result.images, result.settings["seeds"], strict=True)]
            base = []
            if request.compare_base:
                progress(0.6, "generating the base model's images (no identity)")
                base_result = generate_cli.generate_images(pipe, args, identity=False)
                base = [
                    (im, f"base model, seed {s}")
                    for im, s in zip(base_result.images, result.settings["seeds"], strict=True)
                ]
            progress(0.8, "writing settings.json and embeds.safetensors")
            out = self.new_run_dir()
            files = generate_cli.save_result(result, out, command="app", argv=["bolid", "generate", *argv])
            progress(0.9, "scoring Body Sim")
            refs = [(r.image, Path(n).name) for r, n in zip(result.references, names or paths, strict=True)]
            paired = [x for pair in zip(images, base, strict=True) for x in pair] if base else images
            table, note = self.body_sim_rows(paired, refs)
        command = shlex.join(
            ["python", "-m", "bolid", "generate", *argv[: argv.index("--")], "-o", "OUT", "--", *(names or paths)]
        )
        return GenerationView(paired, table, files, command, result.settings, note)

    # -------------------------------------------------------------------------------------------- Body Sim

    def body_sim_matrix(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]):
        """Body Sim of every generated image against every reference: ``(sims, reasons)``, each ``(N, R)``.

        ``sims`` is NaN and ``reasons`` indexes :data:`bolid.metrics.FAILURE_REASONS` where a pair failed.
        """
        metric = self.body_sim
        gen = metric.keypoints(list(generated))  # (N, 17, 3)
        ref = metric.keypoints(list(references))  # (R, 17, 3)
        n, r = len(gen), len(ref)
        sims, reasons = body_similarity(
            gen.repeat_interleave(r, 0),
            ref.repeat(n, 1, 1),
            metric.stats_mean,
            metric.stats_std,
            metric.min_score,
            metric.min_features,
        )
        return sims.view(n, r), reasons.view(n, r)

    def body_sim_rows(self, images: list[tuple[Image.Image, str]], refs: list[tuple[Image.Image, str]]):
        """One table row per image: its label, the mean Body Sim over the references, each reference's value."""
        try:
            sims, reasons = self.body_sim_matrix([im for im, _ in images], [im for im, _ in refs])
        except ImportError as e:
            return [], f"Body Sim unavailable: {e}"
        rows = []
        for i, (_, label) in enumerate(images):
            ok = reasons[i] < 0
            row = {"image": label, "Body Sim": float(sims[i][ok].mean()) if bool(ok.any()) else math.nan}
            for j, (_, ref_name) in enumerate(refs):
                value = float(sims[i, j])
                row[f"vs {ref_name}"] = value if not math.isnan(value) else FAILURE_REASONS[int(reasons[i, j])]
            failed = sorted({FAILURE_TEXT[FAILURE_REASONS[int(k)]] for k in reasons[i][~ok]})
            row["note"] = "; ".join(failed)
            rows.append(row)
        return rows, None

    def close(self) -> None:
        """Delete the temporary folder (when the engine made it)."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
