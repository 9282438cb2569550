"""BoLID-mini's world: procedural people drawn with PIL, with exact COCO-17 keypoints.

The world is small enough to train every BoLID component from scratch on a CPU (as nanoGPT's
``shakespeare_char`` is for language models) and rich enough that *body identity* is a real signal:

* **Identity** (:class:`Identity`, fixed per person): stature and six segment lengths drawn from the
  anthropometric fractions of stature in Winter's table (Drillis & Contini; ``/work/shared/ANCHORS.md``):
  upper arm 0.186 H, forearm 0.146, thigh 0.245, shank 0.246, biacromial 0.259, bi-iliac 0.191, with COCO's
  hip keypoints at 0.6 of the bi-iliac breadth. Segment lengths are log-normal around those fractions,
  positively correlated (r = 0.6, as surveys report 0.5-0.8); breadths vary more than lengths (CV 7% vs
  5%) and go with a ``build`` factor that also sets limb thickness. At 64 px a person is ~50 px tall, so a
  5% difference in a forearm is 0.4 px: the spread is multiplied by ``spread`` (default 3) so that
  bodies differ visibly; ``spread=1`` gives survey-realistic people. Face look: skin tone, hair colour
  and style.
* **Photo** (:class:`Photo`, per render): limb angles, a body turn (yaw, which narrows shoulders and hips
  by ``cos(yaw)`` as in a real 2D projection), small position jitter, shirt and trouser colours, and a scene
  that the caption names (``"a photo of a person on a beach, wearing a red shirt and blue trousers"``).

Every render knows its 17 COCO keypoints exactly (``x, y, 2`` in pixels; face points are on the head).
:func:`write_world` writes ``<root>/<identity>/<photo>.png`` folders (the layout the datapipe ingests)
plus ``<root>/labels.jsonl`` (identity, photo, caption, keypoints, scene, colours) for the models that
train on exact labels (the mini keypoint models, the mini CLIP). Everything is deterministic from a seed:
identity ``i`` of seed ``s`` is the same person whatever the number of identities or photos.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bolid.files import atomic_write

#: Mean segment length as a fraction of stature (Winter; COCO hip keypoints at 0.6 x bi-iliac breadth).
SEGMENT_FRACTIONS = {
    "upper_arm": 0.186,
    "forearm": 0.146,
    "thigh": 0.245,
    "shin": 0.246,
    "shoulder_width": 0.259,
    "hip_width": 0.191 * 0.6,
}
#: Joint heights as fractions of stature (Winter).
SHOULDER_HEIGHT, HIP_HEIGHT = 0.818, 0.530
LENGTH_CV, BREADTH_CV, STATURE_CV, SEGMENT_R = 0.05, 0.07, 0.04, 0.6

SCENES = {
    "on a beach": ((135, 195, 235), (225, 205, 150)),
    "in a city at night": ((20, 22, 50), (55, 55, 60)),
    "in a forest": ((70, 120, 70), (60, 90, 40)),
    "in the snow": ((185, 195, 210), (240, 242, 248)),
    "in a studio": ((150, 150, 155), (110, 110, 115)),
    "in the desert": ((240, 190, 120), (210, 150, 80)),
}
COLOURS = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "green": (40, 150, 60),
    "yellow": (230, 200, 40),
    "black": (25, 25, 25),
    "white": (235, 235, 235),
    "purple": (120, 50, 160),
    "orange": (235, 130, 30),
}
SKIN = ((255, 220, 185), (235, 190, 150), (200, 150, 110), (160, 110, 75), (110, 70, 45), (80, 50, 35))
HAIR = {"black": (20, 18, 18), "brown": (100, 60, 30), "blond": (225, 195, 110), "red": (170, 70, 30),
        "grey": (160, 160, 160)}  # fmt: skip
HAIR_STYLES = ("short", "long", "bald")
#: Words for the skin tones (in ``SKIN``'s order) and the thresholds of "short"/"tall" stature and "slim"/"stocky"
#: build (about the thirds of the world's distributions) for captions that name a person's look.
SKIN_WORDS = ("pale", "fair", "olive", "tan", "brown", "dark")
STATURE_WORDS, BUILD_WORDS = ((0.70, "short"), (0.74, "tall")), ((-0.3, "slim"), (0.3, "stocky"))


@dataclass(frozen=True)
class Identity:
    """A person: stature (fraction of the frame), segment lengths (fractions of stature), build and look."""

    name: str
    stature: float
    segments: dict[str, float]
    build: float
    skin: tuple[int, int, int]
    hair: str
    hair_style: str

    @property
    def look(self) -> str:
        """The person in words, for a caption: ``"a tall stocky person with dark skin and short black hair"``."""
        words = []
        for value, ((low, small), (high, large)) in ((self.stature, STATURE_WORDS), (self.build, BUILD_WORDS)):
            words += [small] if value < low else [large] if value > high else []
        hair = "no hair" if self.hair_style == "bald" else f"{self.hair_style} {self.hair} hair"
        return " ".join(["a", *words, f"person with {SKIN_WORDS[SKIN.index(self.skin)]} skin and {hair}"])


@dataclass(frozen=True)
class Photo:
    """One render's pose, clothes and scene."""

    scene: str
    shirt: str
    trousers: str
    yaw: float  # body turn in radians: widths shrink by cos(yaw)
    arm_angles: tuple[float, float, float, float]  # l upper, l fore, r upper, r fore (radians from straight down)
    leg_angles: tuple[float, float, float, float]  # l thigh, l shin, r thigh, r shin
    dx: float
    dy: float

    @property
    def caption(self) -> str:
        """What a captioner can see: the scene and the clothes (never who the person is)."""
        return self.describe("a person")

    def describe(self, subject: str) -> str:
        """The caption with ``subject`` for "a person" (e.g. :attr:`Identity.look`)."""
        return f"a photo of {subject} {self.scene}, wearing a {self.shirt} shirt and {self.trousers} trousers"


def make_identity(seed: int, index: int, spread: float = 3.0) -> Identity:
    """Identity ``index`` of the world with ``seed`` (independent of how many identities are drawn)."""
    rng = np.random.default_rng([seed, index, 1])
    names = list(SEGMENT_FRACTIONS)
    cv = np.array([LENGTH_CV] * 4 + [BREADTH_CV] * 2) * spread
    corr = np.full((6, 6), SEGMENT_R) + np.eye(6) * (1 - SEGMENT_R)
    z = rng.multivariate_normal(np.zeros(6), corr)
    build = float(np.clip(z[4:].mean() * 0.5 + rng.normal(0, 0.5), -2.5, 2.5))
    segs = {n: float(SEGMENT_FRACTIONS[n] * math.exp(c * v)) for n, c, v in zip(names, cv, z, strict=True)}
    stature = float(0.72 * math.exp(STATURE_CV * spread * 0.5 * rng.normal()))
    return Identity(
        name=f"p{seed:02d}_{index:04d}",
        stature=stature,
        segments=segs,
        build=build,
        skin=SKIN[int(rng.integers(len(SKIN)))],
        hair=list(HAIR)[int(rng.integers(len(HAIR)))],
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
    )


def make_photo(seed: int, identity: int, index: int) -> Photo:
    """Photo ``index`` of identity ``identity``: pose, clothes and scene."""
    rng = np.random.default_rng([seed, identity, index, 2])
    arms = rng.uniform([-0.3, -0.5, -0.3, -0.5], [1.2, 1.8, 1.2, 1.8])  # outwards positive (abduction)
    legs = rng.uniform([-0.1, -0.3, -0.1, -0.3], [0.45, 0.3, 0.45, 0.3])
    return Photo(
        scene=list(SCENES)[int(rng.integers(len(SCENES)))],
        shirt=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        trousers=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        yaw=float(rng.uniform(-0.7, 0.7)),
        arm_angles=tuple(float(a) for a in arms),
        leg_angles=tuple(float(a) for a in legs),
        dx=float(rng.uniform(-0.08, 0.08)),
        dy=float(rng.uniform(-0.03, 0.03)),
    )


def keypoints(ident: Identity, photo: Photo, size: int) -> np.ndarray:
    """The 17 COCO keypoints ``(17, 3)`` = ``x, y, 2`` in pixels of a ``size`` x ``size`` render."""
    h = ident.stature * size
    s = {k: v * h for k, v in ident.segments.items()}
    cx = size * (0.5 + photo.dx)
    feet = size * (0.95 + photo.dy)
    turn = math.cos(photo.yaw)
    sh_y, hip_y = feet - SHOULDER_HEIGHT * h, feet - HIP_HEIGHT * h
    # The torso is the frame: shoulders and hips at their surveyed heights, legs hang from the hips.
    lsh = np.array([cx + s["shoulder_width"] / 2 * turn, sh_y])  # the person faces the camera: left is image right
    rsh = np.array([cx - s["shoulder_width"] / 2 * turn, sh_y])
    lhip = np.array([cx + s["hip_width"] / 2 * turn, hip_y])
    rhip = np.array([cx - s["hip_width"] / 2 * turn, hip_y])

    def chain(start, side, l1, l2, a1, a2):
        d1 = np.array([side * math.sin(a1), math.cos(a1)])
        p1 = start + l1 * d1
        a = a1 + a2
        p2 = p1 + l2 * np.array([side * math.sin(a), math.cos(a)])
        return p1, p2

    al1, al2, ar1, ar2 = photo.arm_angles
    ll1, ll2, lr1, lr2 = photo.leg_angles
    lel, lwr = chain(lsh, 1, s["upper_arm"], s["forearm"], al1, al2)
    rel, rwr = chain(rsh, -1, s["upper_arm"], s["forearm"], ar1, ar2)
    # Knees bend backwards: the shin angle is relative and mostly towards the body's midline.
    lkn, lan = chain(lhip, 1, s["thigh"], s["shin"], ll1, -ll1 + ll2 * 0.5)
    rkn, ran = chain(rhip, -1, s["thigh"], s["shin"], lr1, -lr1 + lr2 * 0.5)
    neck = (lsh + rsh) / 2
    head_r = 0.065 * h
    head = neck + np.array([math.sin(photo.yaw) * head_r * 0.3, -0.08 * h - head_r * 0.2])
    eye_dx, ear_dx = head_r * 0.4 * turn, head_r * 0.95 * turn
    shift = math.sin(photo.yaw) * head_r * 0.5
    nose = head + np.array([shift, head_r * 0.15])
    leye = head + np.array([eye_dx + shift, -head_r * 0.15])
    reye = head + np.array([-eye_dx + shift, -head_r * 0.15])
    lear = head + np.array([ear_dx, 0.0])
    rear = head + np.array([-ear_dx, 0.0])
    pts = [nose, leye, reye, lear, rear, lsh, rsh, lel, rel, lwr, rwr, lhip, rhip, lkn, rkn, lan, ran]
    return np.array([[p[0], p[1], 2.0] for p in pts], np.float32)


def _background(draw: ImageDraw.ImageDraw, scene: str, size: int, rng: np.random.Generator) -> None:
    sky, ground = SCENES[scene]
    horizon = int(size * rng.uniform(0.55, 0.7))
    draw.rectangle([0, 0, size, horizon], fill=sky)
    draw.rectangle([0, horizon, size, size], fill=ground)
    if scene == "in a city at night":
        for _ in range(6):
            x0 = rng.uniform(0, size)
            w, top = rng.uniform(0.1, 0.25) * size, rng.uniform(0.15, 0.45) * size
            draw.rectangle([x0, top, x0 + w, horizon], fill=(35, 35, 55))
            for _ in range(4):
                wx, wy = rng.uniform(x0, x0 + w), rng.uniform(top, horizon)
                draw.rectangle([wx, wy, wx + size / 40, wy + size / 40], fill=(250, 220, 90))
    elif scene == "in a forest":
        for _ in range(5):
            x = rng.uniform(0, size)
            draw.rectangle([x, size * 0.1, x + size * 0.05, horizon], fill=(80, 55, 30))
            draw.ellipse([x - size * 0.1, 0, x + size * 0.15, size * 0.3], fill=(30, 90, 35))
    elif scene == "on a beach":
        draw.rectangle([0, horizon - size * 0.08, size, horizon], fill=(40, 110, 190))
        draw.ellipse([size * 0.75, size * 0.05, size * 0.9, size * 0.2], fill=(255, 240, 120))
    elif scene == "in the desert":
        for _ in range(2):
            x = rng.uniform(0, size)
            draw.ellipse(
                [x - size * 0.3, horizon - size * 0.1, x + size * 0.3, horizon + size * 0.1], fill=(200, 140, 70)
            )
    elif scene == "in the snow":
        for _ in range(25):
            x, y = rng.uniform(0, size, 2)
            draw.point((x, y), fill=(255, 255, 255))


def render(ident: Identity, photo: Photo, size: int = 64, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """Draw one photo; returns the RGB image and its exact keypoints ``(17, 3)``.

    Drawn at 4x and downsampled (anti-aliased), so sub-pixel differences between bodies survive.
    """
    ss = 4
    big = size * ss
    rng = np.random.default_rng([seed, zlib.crc32(ident.name.encode()), zlib.crc32(repr(photo).encode()), 3])
    im = Image.new("RGB", (big, big))
    d = ImageDraw.Draw(im)
    _background(d, photo.scene, big, rng)
    kp = keypoints(ident, photo, size)
    p = kp[:, :2] * ss
    h = ident.stature * big
    thick = 1.0 + 0.12 * ident.build
    limb_w = max(2, int(0.055 * h * thick))
    shirt, trousers, skin = COLOURS[photo.shirt], COLOURS[photo.trousers], ident.skin

    def line(a, b, colour, w):
        d.line([tuple(p[a]), tuple(p[b])], fill=colour, width=w)
        for q in (a, b):
            d.ellipse([p[q][0] - w / 2, p[q][1] - w / 2, p[q][0] + w / 2, p[q][1] + w / 2], fill=colour)

    # Legs (behind the torso), torso, arms, head.
    for hip, knee, ankle in ((11, 13, 15), (12, 14, 16)):
        line(hip, knee, trousers, int(limb_w * 1.3))
        line(knee, ankle, trousers, int(limb_w * 1.1))
        a = p[ankle]
        d.ellipse(
            [a[0] - limb_w * 0.8, a[1] - limb_w * 0.3, a[0] + limb_w * 0.8, a[1] + limb_w * 0.5], fill=(40, 30, 25)
        )
    waist = 1.0 + 0.08 * ident.build
    hips_c = (p[11] + p[12]) / 2
    torso = [p[5], p[6], hips_c + (p[12] - hips_c) * 1.4 * waist, hips_c + (p[11] - hips_c) * 1.4 * waist]
    d.polygon([tuple(q) for q in torso], fill=shirt)
    for sh, el, wr in ((5, 7, 9), (6, 8, 10)):
        line(sh, el, shirt, limb_w)
        line(el, wr, skin, int(limb_w * 0.8))
        w = p[wr]
        d.ellipse([w[0] - limb_w * 0.6, w[1] - limb_w * 0.6, w[0] + limb_w * 0.6, w[1] + limb_w * 0.6], fill=skin)
    neck = (p[5] + p[6]) / 2
    head_r = 0.065 * h
    centre = (p[3] + p[4]) / 2
    line_w = int(limb_w * 0.7)
    d.line([tuple(neck), tuple(centre)], fill=skin, width=line_w)
    hair = HAIR[ident.hair]
    if ident.hair_style == "long":
        d.rectangle(
            [centre[0] - head_r * 1.1, centre[1], centre[0] + head_r * 1.1, centre[1] + head_r * 1.8], fill=hair
        )
    d.ellipse([centre[0] - head_r, centre[1] - head_r * 1.15, centre[0] + head_r, centre[1] + head_r * 1.05], fill=skin)
    if ident.hair_style != "bald":
        d.chord(
            [centre[0] - head_r * 1.05, centre[1] - head_r * 1.25, centre[0] + head_r * 1.05, centre[1] + head_r * 0.6],
            180,
            360,
            fill=hair,
        )
    if abs(photo.yaw) < 1.2:
        for e in (1, 2):
            d.ellipse(
                [p[e][0] - ss * 0.6, p[e][1] - ss * 0.6, p[e][0] + ss * 0.6, p[e][1] + ss * 0.6], fill=(20, 20, 30)
            )
    return im.resize((size, size), Image.Resampling.LANCZOS), kp


def iter_world(
    seed: int, identities: int, photos: int, size: int = 64, spread: float = 3.0, start: int = 0
) -> Iterator[tuple[Identity, int, Photo, Image.Image, np.ndarray]]:
    """``(identity, photo index, photo, image, keypoints)`` for identities ``start .. start + identities - 1``."""
    for i in range(start, start + identities):
        ident = make_identity(seed, i, spread)
        for j in range(photos):
            photo = make_photo(seed, i, j)
            im, kp = render(ident, photo, size, seed)
            yield ident, j, photo, im, kp


def write_world(
    root: str | Path,
    seed: int,
    identities: int,
    photos: int,
    size: int = 64,
    spread: float = 3.0,
    progress=None,
) -> Path:
    """Write ``<root>/<identity>/<photo>.png`` and ``<root>/labels.jsonl``; a finished world is kept as is.

    ``<root>/world.json`` (written last) records the settings; a run with the same settings returns at once,
    one with other settings is an error (delete the folder to re-render).
    """
    root = Path(root)
    settings = {"seed": seed, "identities": identities, "photos": photos, "size": size, "spread": spread}
    done = root / "world.json"
    if done.exists():
        old = json.loads(done.read_text())
        if old != settings:
            raise ValueError(f"{root} holds a world rendered with {old}, not {settings}: delete it to re-render")
        return root
    lines = []
    total = identities * photos
    bar = progress(total=total, desc=f"render {root.name}") if progress else None
    for ident, j, photo, im, kp in iter_world(seed, identities, photos, size, spread):
        folder = root / ident.name
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{j:03d}.png")
        row = {
            "identity": ident.name,
            "photo": f"{ident.name}/{j:03d}.png",
            "caption": photo.caption,
            "keypoints": kp.round(3).tolist(),
            **{k: v for k, v in asdict(photo).items() if k in ("scene", "shirt", "trousers", "yaw")},
            "segments": ident.segments,
            "stature": ident.stature,
        }
        lines.append(json.dumps(row))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    atomic_write(root / "labels.jsonl", "\n".join(lines) + "\n")
    atomic_write(done, json.dumps(settings))
    return root


def read_labels(root: str | Path) -> list[dict]:
    """The rows of ``<root>/labels.jsonl``."""
    path = Path(root) / "labels.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a rendered mini world (run bolid.mini.world.write_world)")
    return [json.loads(line) for line in path.read_text().splitlines() if line]
