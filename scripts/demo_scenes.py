"""The demo model's world: simple scenes described in text (a coloured shape at a position on a plain background).

Used by ``train_demo.py`` to render its training set, and by the tests and the fidelity protocol to judge whether
an image follows its prompt (dominant colour and position of what is not background). Pure Python + PIL + numpy.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # the demo model's native resolution (16x16 latent, 8x8 patches)
COLOURS = {"red": (220, 35, 35), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 210, 40),
           "orange": (245, 135, 25), "purple": (140, 55, 180), "white": (245, 245, 245), "black": (20, 20, 20)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72), "in the center": (0.5, 0.5)}


def prompt_of(colour: str, shape: str, position: str, background: str) -> str:
    return f"a {colour} {shape} {position}, {background} background"


def all_scenes() -> list[tuple[str, str, str, str]]:
    """Every (colour, shape, position, background) with a shape that stands out from its background."""
    return [(c, s, p, b) for b in BACKGROUNDS for c in COLOURS for s in SHAPES for p in POSITIONS
            if COLOURS[c] != BACKGROUNDS[b]]


def split(seed: int = 7, held_out: float = 0.12) -> tuple[list, list]:
    """(training scenes, held-out scenes): the held-out prompts are never seen in training."""
    scenes = all_scenes()
    rnd = random.Random(seed)
    rnd.shuffle(scenes)
    n = int(len(scenes) * held_out)
    return sorted(scenes[n:]), sorted(scenes[:n])


def parse(prompt: str) -> tuple[str, str, str, str]:
    """The scene a prompt describes (the inverse of ``prompt_of``); ValueError for anything else."""
    for c, s, p, b in all_scenes():
        if prompt_of(c, s, p, b) == prompt.strip():
            return c, s, p, b
    raise ValueError(f"not a demo-scene prompt: {prompt!r} (e.g. {prompt_of('red', 'circle', 'top left', 'white')!r})")


def render(scene, rnd: random.Random, size: int = SIZE) -> np.ndarray:
    """An HxWx3 uint8 image of ``scene`` with a little jitter in place and size (anti-aliased: drawn at 4x)."""
    colour, shape, position, background = scene
    k = 4
    big = size * k
    img = Image.new("RGB", (big, big), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx = (cx + rnd.uniform(-0.04, 0.04)) * big
    cy = (cy + rnd.uniform(-0.04, 0.04)) * big
    r = rnd.uniform(0.14, 0.19) * big
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.9
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=fill)
    return np.asarray(img.resize((size, size), Image.BOX))


def judge(image: np.ndarray, prompt: str) -> dict:
    """Does ``image`` (HxWx3, uint8 or floats in [0, 1]) show what ``prompt`` asks for? The pixels far from the
    prompt's background colour are the object: their mean colour's nearest named colour and their centroid's
    nearest named position are compared with the prompt's."""
    colour, _, position, background = parse(prompt)
    img = np.asarray(image, dtype=np.float32)
    if img.max() <= 1.0:
        img = img * 255.0
    h, w = img.shape[:2]
    bg = np.array(BACKGROUNDS[background], np.float32)
    mask = np.linalg.norm(img - bg, axis=-1) > 60
    out = {"colour": None, "position": None, "object_fraction": float(mask.mean())}
    if mask.sum() < 0.01 * h * w:
        return dict(out, colour_ok=False, position_ok=False)
    mean = img[mask].mean(axis=0)
    out["colour"] = min(COLOURS, key=lambda c: float(np.linalg.norm(mean - np.array(COLOURS[c], np.float32))))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return dict(out, colour_ok=out["colour"] == colour, position_ok=out["position"] == position)
