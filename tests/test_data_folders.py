"""Data folders as people have them (issue #17, points 3-6): hidden/system entries, class names in any
script, images that do not decode, and every image mode and bit depth decoding to the same 8-bit RGB.

Everything is generated here (a tiny open_clip CLIP, image files written with Pillow or by hand); nothing is downloaded.
"""

from __future__ import annotations

import re
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from test_clip_suites import ARCH, tiny_clip

from merging.cli import main
from merging.errors import ConfigError, DataError
from merging.suites import templates
from merging.suites.clip.images import assign_labels, load_task_data, read_rgb8, to_rgb8, unreadable_images
from merging.suites.clip.suite import check
from merging.suites.config import SuiteConfig

RNG = np.random.default_rng(17)


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, str]:
    """A tiny open_clip CLIP's config JSON, whole pretrained checkpoint and a visual-only fine-tuned one."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model, cfg_path = tiny_clip(root)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "pretrained.safetensors")
    save_file({k[7:]: v for k, v in state.items() if k.startswith("visual.")}, root / "finetuned.safetensors")
    return {
        "model_config": str(cfg_path),
        "pretrained": str(root / "pretrained.safetensors"),
        "finetuned": str(root / "finetuned.safetensors"),
    }


def write_config(path: Path, model_files: dict[str, str], data_root: Path, tasks: list[str], **extra) -> Path:
    cfg = {
        "layout": "open_clip",
        "model": ARCH,
        "model_config": model_files["model_config"],
        "pretrained": model_files["pretrained"],
        "finetuned": {t: model_files["finetuned"] for t in tasks},
        "data_root": str(data_root),
        "tasks": tasks,
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def image(path: Path, size: tuple[int, int] = (12, 10)) -> Path:
    """A small random RGB picture (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def classes_folder(split: Path, classes: list[str], per_class: int = 2) -> dict[str, list[Path]]:
    return {c: [image(split / c / f"{j}.{'png' if j % 2 else 'jpg'}") for j in range(per_class)] for c in classes}


def config_for(data_root: Path, **fields) -> SuiteConfig:
    return SuiteConfig(path=data_root / "suite.yaml", name="t", layout="open_clip", model=ARCH, data_root=data_root, **fields)


IDENTITY = (lambda im: im.resize((8, 8)), (0.5,) * 3, (0.25,) * 3, (8, 8))
"""A stand-in for open_clip's val transform: (PIL part, mean, std, size)."""


def report_of(config: Path) -> tuple[int, list[str]]:
    rows = check(config)
    return sum(not ok for ok, _ in rows), [m for _, m in rows]


# ------------------------------------------------------------------------------------- 3. hidden and system entries
def add_junk(split: Path, cls: str) -> None:
    """What Jupyter, macOS and Windows leave beside images: at the class level and inside a class folder."""
    image(split / ".ipynb_checkpoints" / "0-checkpoint.png")
    (split / "__MACOSX" / cls).mkdir(parents=True)
    (split / "__MACOSX" / cls / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (split / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (split / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (split / cls / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (split / cls / ".DS_Store").write_bytes(b"Bud1")
    (split / cls / "THUMBS.DB").write_bytes(b"\xd0\xcf\x11\xe0")
    (split / cls / "Desktop.ini").write_text("[.ShellClassInfo]\n")
    image(split / cls / ".ipynb_checkpoints" / "1-checkpoint.png")


def test_hidden_and_system_entries_are_neither_classes_nor_images(tmp_path):
    split = tmp_path / "shapes" / "test"
    files = classes_folder(split, ["circle", "square", "triangle"])
    add_junk(split, "circle")
    (split / "square" / "notes.txt").write_text("shot on a phone")

    data = load_task_data(config_for(tmp_path), "shapes", IDENTITY)
    assert data.classnames == ["circle", "square", "triangle"]
    assert data.test_images.files == [str(p) for c in ("circle", "square", "triangle") for p in sorted(files[c])]
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.hidden == (
        ".DS_Store",
        ".ipynb_checkpoints/",
        "Thumbs.db",
        "__MACOSX/",
        "desktop.ini",
        "circle/.DS_Store",
        "circle/._0.jpg",
        "circle/.ipynb_checkpoints/",
        "circle/Desktop.ini",
        "circle/THUMBS.DB",
    )
    assert data.other == ("square/notes.txt",)


def test_digit_class_folders_with_a_checkpoint_folder(tmp_path):
    split = tmp_path / "mnist" / "test"
    classes_folder(split, ["0", "1"], per_class=1)
    image(split / ".ipynb_checkpoints" / "x.png")
    data = load_task_data(config_for(tmp_path), "MNIST", IDENTITY)
    assert data.num_classes == 10 and data.test_labels.tolist() == [0, 1] and data.hidden == (".ipynb_checkpoints/",)


def test_only_hidden_folders_is_a_one_line_error_naming_them(tmp_path):
    split = tmp_path / "shapes" / "test"
    image(split / ".ipynb_checkpoints" / "0.png")
    (split / "__MACOSX").mkdir()
    with pytest.raises(DataError) as e:
        load_task_data(config_for(tmp_path), "shapes", IDENTITY)
    msg = str(e.value)
    assert "\n" not in msg and str(split) in msg and "no class folders" in msg and ".ipynb_checkpoints/, __MACOSX/" in msg


def test_suite_check_says_what_it_skipped(tmp_path, model_files, capsys):
    data = tmp_path / "data"
    classes_folder(data / "shapes" / "test", ["circle", "square", "triangle"])
    image(data / "shapes" / "test" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (data / "shapes" / "test" / "__MACOSX" / "circle").mkdir(parents=True)
    classes_folder(data / "mnist" / "test", ["0", "1"])
    add_junk(data / "mnist" / "test", "1")
    (data / "mnist" / "test" / "labels.csv").write_text("file,label\n")
    config = write_config(tmp_path / "s.yaml", model_files, data, ["shapes", "MNIST"])

    assert main(["suite", "check", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ok    shapes: 6 test images, 3 classes in " + str(data / "shapes" / "test") in out
    assert "ok    shapes: skipped 2 hidden/system entries: .ipynb_checkpoints/, __MACOSX/" in out
    mnist = [line for line in out if line.startswith("ok    MNIST: skipped")]
    assert mnist == [
        "ok    MNIST: skipped 10 hidden/system entries: .DS_Store, .ipynb_checkpoints/, Thumbs.db, __MACOSX/, desktop.ini "
        "and 5 more; 1 other entry (not a class folder or image): labels.csv"
    ]
    assert "ok    MNIST: 4 test images, 10 classes in " + str(data / "mnist" / "test") in out


# ------------------------------------------------------------------------------------- 4. class names in any script
CHINESE = ["猫", "狗", "鸟"]
RUSSIAN = ["кошка", "собака"]


def test_normalize_name_keeps_every_script():
    assert templates.normalize_name("Ram C/V Cargo Van") == templates.normalize_name("ram c-v cargo_van") == "ramcvcargovan"
    assert [templates.normalize_name(n) for n in CHINESE] == CHINESE
    assert templates.normalize_name("Собака Бывает") == "собакабывает"
    assert templates.normalize_name("ЁЛКА") == templates.normalize_name("ёлка")
    assert templates.normalize_name("Straße") == templates.normalize_name("STRASSE") == "strasse"
    assert templates.normalize_name(unicodedata.normalize("NFD", "Café")) == templates.normalize_name("café") == "café"
    assert templates.normalize_name("ＡＢＣ１２") == "abc12"  # full-width forms (NFKC)
    assert templates.normalize_name("हिन्दी") == "हिन्दी"  # marks are kept: they tell Devanagari words apart
    assert templates.normalize_name("— ★ —") == ""


@pytest.mark.parametrize("names", [CHINESE, RUSSIAN], ids=["chinese", "russian"])
def test_classnames_file_in_another_script_labels_its_folders(tmp_path, names):
    split = tmp_path / "mine" / "test"
    files = classes_folder(split, names[::-1], per_class=1)
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names) + "\n", encoding="utf-8")
    data = load_task_data(config_for(tmp_path, classnames={"mine": names_file}), "mine", IDENTITY)
    assert data.classnames == names
    by_file = dict(zip(data.test_images.files, data.test_labels.tolist(), strict=True))
    assert by_file == {str(files[n][0]): i for i, n in enumerate(names)}


def test_folder_names_as_macos_and_keyboards_write_them(tmp_path):
    names = ["café", "고양이", "кошка", "ABC"]
    folders = [unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFD", "고양이"), "КОШКА", "ＡＢＣ"]
    assert folders[1] != names[1]  # macOS stores Hangul as jamo
    assert assign_labels("mine", folders, names, "x") == ([0, 1, 2, 3], names)


def test_exact_names_match_before_normalised_ones():
    names = ["Ёлка", "ёлка", "сосна"]
    assert assign_labels("mine", ["ёлка", "Ёлка", "сосна"], names, "x")[0] == [1, 0, 2]


def test_names_that_normalise_alike_are_reported_by_name():
    with pytest.raises(DataError) as e:
        assign_labels("mine", ["ЁЛКА"], ["Ёлка", "ёлка", "сосна"], "/data/mine/test")
    msg = str(e.value)
    assert "\n" not in msg and "'ЁЛКА'" in msg and "'Ёлка' (label 0) and 'ёлка' (label 1)" in msg and "/data/mine/test" in msg
    with pytest.raises(DataError) as e:
        assign_labels("mine", ["Кошка", "кошка"], RUSSIAN, "/data/mine/test")
    msg = str(e.value)
    assert "\n" not in msg and "class folders 'Кошка' and 'кошка' both map to class 'кошка' (label 0)" in msg


def test_latin_behaviours_are_kept():
    assert assign_labels("GTSRB", ["00000", "00042"], templates.classnames("GTSRB"), "x")[0] == [0, 42]
    assert assign_labels("SUN397", ["a_abbey", "y_youth_hostel"], templates.classnames("SUN397"), "x")[0] == [0, 396]
    cars = templates.classnames("Cars")
    assert assign_labels("Cars", ["ram c-v cargo van minivan 2012"], cars, "x")[0] == [cars.index("Ram C/V Cargo Van Minivan 2012")]
    assert assign_labels("EuroSAT", ["SeaLake", "Forest"], templates.classnames("EuroSAT"), "x")[0] == [9, 1]
    assert assign_labels("mine", ["²", "1"], None, "x") == ([0, 1], ["²", "1"])  # not ASCII digits: names, not indices


def test_classnames_file_with_bom_or_in_a_legacy_encoding(tmp_path):
    split = tmp_path / "mine" / "test"
    classes_folder(split, CHINESE, per_class=1)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\n".join(CHINESE).encode("utf-8-sig"))
    assert load_task_data(config_for(tmp_path, classnames={"mine": bom}), "mine", IDENTITY).classnames == CHINESE
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("\n".join(CHINESE).encode("gbk"))
    with pytest.raises(ConfigError) as e:
        load_task_data(config_for(tmp_path, classnames={"mine": gbk}), "mine", IDENTITY)
    assert "\n" not in str(e.value) and str(gbk) in str(e.value) and "UTF-8" in str(e.value)


def test_suite_check_with_chinese_class_folders(tmp_path, model_files):
    data = tmp_path / "data"
    classes_folder(data / "mine" / "test", CHINESE)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CHINESE), encoding="utf-8")
    problems, lines = report_of(write_config(tmp_path / "s.yaml", model_files, data, ["mine"], classnames={"mine": str(names)}))
    assert problems == 0, lines
    assert f"mine: 6 test images, 3 classes in {data / 'mine' / 'test'}" in lines


# ------------------------------------------------------------------------------------- 5. images that do not decode
def broken_files(folder: Path) -> list[Path]:
    """A text file named .jpg, a truncated PNG, a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "broken.jpg"
    text.write_text("this is not an image\n")
    png, jpg = image(folder / "cut.png", (64, 48)), image(folder / "cut.jpg", (64, 48))
    for path in (png, jpg):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [text, png, jpg]


def test_suite_check_decodes_every_image_and_names_each_bad_one(tmp_path, model_files, capsys):
    data = tmp_path / "data"
    classes_folder(data / "shapes" / "test", ["circle", "square"])
    bad = broken_files(data / "shapes" / "test" / "square")
    config = write_config(tmp_path / "s.yaml", model_files, data, ["shapes"])

    assert main(["suite", "check", str(config)]) == 2
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL  shapes: 3 of 7 images cannot be decoded: "), out
    for path in bad:
        assert str(path) in fails[0]
    assert "not an image file Pillow can identify" in fails[0] and "truncated" in fails[0]

    # the loader fails the same way, in one line naming the file
    suite_data = load_task_data(config_for(data), "shapes", IDENTITY)
    index = suite_data.test_images.files.index(str(bad[0]))
    with pytest.raises(DataError, match=f"^{re.escape(str(bad[0]))}: not a readable image"):
        suite_data.test_images[index]


def test_suite_check_names_the_first_few_and_counts_the_rest(tmp_path, model_files):
    data = tmp_path / "data"
    classes_folder(data / "shapes" / "test", ["circle"])
    for i in range(8):
        (data / "shapes" / "test" / "circle" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    problems, lines = report_of(write_config(tmp_path / "s.yaml", model_files, data, ["shapes"]))
    assert problems == 1
    line = next(m for m in lines if "cannot be decoded" in m)
    assert line.startswith("shapes: 8 of 10 images cannot be decoded: ") and line.endswith(" and 3 more; replace or remove them")
    assert [f"bad{i}.png" in line for i in range(8)] == [True] * 5 + [False] * 3


def test_suite_check_passes_when_every_image_decodes(tmp_path, model_files):
    data = tmp_path / "data"
    classes_folder(data / "shapes" / "test", ["circle", "square"], per_class=3)
    problems, lines = report_of(write_config(tmp_path / "s.yaml", model_files, data, ["shapes"], limit=4))
    assert problems == 0 and "shapes: all 4 images decode" in lines


def test_unreadable_images_keeps_file_order_across_chunks(tmp_path):
    files = [image(tmp_path / f"{i:03d}.png", (8, 8)) for i in range(20)]
    for i in (3, 11, 17):
        files[i].write_bytes(b"junk")
    bad = unreadable_images([str(p) for p in files], chunk=4)
    assert [p for p, _ in bad] == [str(files[i]) for i in (3, 11, 17)]


# ------------------------------------------------------------------------------------- 6. every mode decodes to the same 8-bit RGB
H, W = 12, 16
ORIGINAL = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (H, W), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W), dtype=np.uint8)
ALPHA[0, :4] = 0  # fully transparent pixels keep their colour too
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDICES = RNG.integers(0, 256, (H, W), dtype=np.uint8)
SMOOTH = np.asarray(Image.fromarray(RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((W, H), Image.BILINEAR))
"""Lossy formats get a smooth picture, as photographs are; exact formats get noise."""


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def palette_image(mode: str = "P") -> Image.Image:
    im = Image.fromarray(INDICES, "L").convert("P")
    im.putpalette(PALETTE.tobytes())
    if mode == "PA":
        im = im.convert("PA")
        im.putalpha(Image.fromarray(ALPHA))
    return im


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit-per-sample PNG written by hand (Pillow cannot write 16-bit colour): 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


G16 = GRAY.astype(np.uint16) * 257  # the usual 8->16-bit expansion, as image editors write it
RANDOM16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
RANDOM16_RGB = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)

# name -> (write the file into a folder, the opened mode, the expected 8-bit RGB)
EXACT = {
    "1 png": (
        lambda d: save(Image.fromarray(GRAY >= 128).convert("1"), d / "a.png"),
        "1",
        rgb(np.where(GRAY >= 128, 255, 0).astype(np.uint8)),
    ),
    "1 bmp": (
        lambda d: save(Image.fromarray(GRAY >= 128).convert("1"), d / "a.bmp"),
        "1",
        rgb(np.where(GRAY >= 128, 255, 0).astype(np.uint8)),
    ),
    "L png": (lambda d: save(Image.fromarray(GRAY), d / "a.png"), "L", rgb(GRAY)),
    "L pgm": (lambda d: save(Image.fromarray(GRAY), d / "a.pgm"), "L", rgb(GRAY)),
    "L tiff": (lambda d: save(Image.fromarray(GRAY), d / "a.tif"), "L", rgb(GRAY)),
    "LA png": (lambda d: save(Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"), d / "a.png"), "LA", rgb(GRAY)),
    "LA tiff": (lambda d: save(Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"), d / "a.tif"), "LA", rgb(GRAY)),
    "P png": (lambda d: save(palette_image(), d / "a.png"), "P", PALETTE[INDICES]),
    "P bmp": (lambda d: save(palette_image(), d / "a.bmp"), "P", PALETTE[INDICES]),
    "P gif": (lambda d: save(palette_image(), d / "a.gif"), "P", PALETTE[INDICES]),
    "P png transparency index": (lambda d: save(palette_image(), d / "a.png", transparency=int(INDICES[0, 0])), "P", PALETTE[INDICES]),
    "P png alpha per entry": (lambda d: save(palette_image(), d / "a.png", transparency=bytes(range(256))), "P", PALETTE[INDICES]),
    "P gif transparency": (lambda d: save(palette_image(), d / "a.gif", transparency=int(INDICES[0, 0])), "P", PALETTE[INDICES]),
    "PA tiff": (lambda d: save(palette_image("PA"), d / "a.tif"), "PA", PALETTE[INDICES]),
    "RGB png": (lambda d: save(Image.fromarray(ORIGINAL), d / "a.png"), "RGB", ORIGINAL),
    "RGB ppm": (lambda d: save(Image.fromarray(ORIGINAL), d / "a.ppm"), "RGB", ORIGINAL),
    "RGB bmp": (lambda d: save(Image.fromarray(ORIGINAL), d / "a.bmp"), "RGB", ORIGINAL),
    "RGB webp lossless": (lambda d: save(Image.fromarray(ORIGINAL), d / "a.webp", lossless=True), "RGB", ORIGINAL),
    "RGBA png": (lambda d: save(Image.fromarray(np.dstack([ORIGINAL, ALPHA]), "RGBA"), d / "a.png"), "RGBA", ORIGINAL),
    "RGBA tiff": (lambda d: save(Image.fromarray(np.dstack([ORIGINAL, ALPHA]), "RGBA"), d / "a.tif"), "RGBA", ORIGINAL),
    "RGBA webp lossless": (
        lambda d: save(Image.fromarray(np.dstack([ORIGINAL, ALPHA]), "RGBA"), d / "a.webp", lossless=True, exact=True),
        "RGBA",
        ORIGINAL,
    ),
    "RGBX tiff": (lambda d: save(Image.fromarray(ORIGINAL).convert("RGBX"), d / "a.tif"), "RGB", ORIGINAL),
    "CMYK tiff": (lambda d: save(Image.fromarray(ORIGINAL).convert("CMYK"), d / "a.tif"), "CMYK", ORIGINAL),
    "I;16 png (v*257)": (lambda d: save(Image.fromarray(G16), d / "a.png"), "I;16", rgb(GRAY)),
    "I;16 png (v<<8)": (lambda d: save(Image.fromarray(GRAY.astype(np.uint16) << 8), d / "a.png"), "I;16", rgb(GRAY)),
    "I;16 png, any 16-bit value": (lambda d: save(Image.fromarray(RANDOM16), d / "a.png"), "I;16", rgb((RANDOM16 >> 8).astype(np.uint8))),
    "I;16 tiff": (lambda d: save(Image.fromarray(G16), d / "a.tif"), "I;16", rgb(GRAY)),
    "I;16B tiff": (lambda d: save(Image.frombytes("I;16B", (W, H), G16.astype(">u2").tobytes()), d / "a.tif"), "I;16B", rgb(GRAY)),
    "I;16L tiff": (lambda d: save(Image.frombytes("I;16L", (W, H), G16.astype("<u2").tobytes()), d / "a.tif"), "I;16", rgb(GRAY)),
    "I pgm 16-bit": (lambda d: save(Image.fromarray(G16), d / "a.pgm"), "I", rgb(GRAY)),
    "I tiff 32-bit": (lambda d: save(Image.fromarray(G16.astype(np.int32)), d / "a.tif"), "I", rgb(GRAY)),
    "F tiff": (lambda d: save(Image.fromarray(GRAY.astype(np.float32)), d / "a.tif"), "F", rgb(GRAY)),
    "F tiff, rounded": (lambda d: save(Image.fromarray(GRAY.astype(np.float32) + np.float32(0.49)), d / "a.tif"), "F", rgb(GRAY)),
    "16-bit RGB png": (lambda d: write_bytes(d / "a.png", png16(ORIGINAL.astype(np.uint16) * 257, 2)), "RGB", ORIGINAL),
    "16-bit RGB png, any value": (lambda d: write_bytes(d / "a.png", png16(RANDOM16_RGB, 2)), "RGB", (RANDOM16_RGB >> 8).astype(np.uint8)),
    "16-bit RGBA png": (
        lambda d: write_bytes(d / "a.png", png16(np.dstack([ORIGINAL, ALPHA]).astype(np.uint16) * 257, 6)),
        "RGBA",
        ORIGINAL,
    ),
    "16-bit gray+alpha png": (
        lambda d: write_bytes(d / "a.png", png16(np.dstack([G16, ALPHA.astype(np.uint16) << 8]), 4)),
        "RGBA",
        rgb(GRAY),
    ),
    "16-bit gray png": (lambda d: write_bytes(d / "a.png", png16(G16, 0)), "I;16", rgb(GRAY)),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_every_mode_decodes_to_its_original_exactly(tmp_path, case):
    write, mode, want = EXACT[case]
    path = write(tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode
    got = np.asarray(read_rgb8(str(path)))
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    np.testing.assert_array_equal(got, want)
    if mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK"):  # 8-bit: what torchvision/open_clip users get
        np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("RGB")))


def test_sixteen_bit_is_within_one_of_exact_scaling():
    got = np.asarray(to_rgb8(Image.fromarray(RANDOM16)))[..., 0].astype(int)
    assert np.abs(got - np.rint(RANDOM16.astype(np.float64) * 255 / 65535)).max() <= 1
    clipped = np.asarray(Image.fromarray(RANDOM16).convert("RGB"))[..., 0]  # what convert("RGB") did before
    assert (clipped == 255).mean() > 0.9


def test_out_of_range_and_nan_values_are_clipped():
    i32 = Image.fromarray(np.array([[-5, 0, 65535, 70000]], dtype=np.int32))
    assert np.asarray(to_rgb8(i32))[0, :, 0].tolist() == [0, 0, 255, 255]
    f = Image.fromarray(np.array([[np.nan, -3.0, 0.5, 1.5, 254.6, 300.0, np.inf]], dtype=np.float32))
    assert np.asarray(to_rgb8(f))[0, :, 0].tolist() == [0, 0, 0, 2, 255, 255, 255]


# in memory only (no format Pillow writes keeps them): premultiplied alpha and HSV
def test_premultiplied_alpha_is_unpremultiplied_then_dropped():
    alpha = np.maximum(ALPHA, 128)  # premultiplied colour keeps ~7 bits at alpha >= 128
    rgba = Image.fromarray(np.dstack([ORIGINAL, alpha]), "RGBA")
    got = np.asarray(to_rgb8(rgba.convert("RGBa"))).astype(int)
    assert np.abs(got - ORIGINAL).max() <= 1
    la = Image.fromarray(np.dstack([GRAY, alpha]), "LA").convert("La")
    assert la.mode == "La"
    assert np.abs(np.asarray(to_rgb8(la)).astype(int) - rgb(GRAY)).max() <= 1


# lossy or quantizing colour spaces: equal to Pillow's own conversion, and close to the original
LOSSY = {
    # name: (write, mode, max abs error, mean abs error) against the original
    "RGB jpeg q95 4:4:4": (lambda d: save(Image.fromarray(SMOOTH), d / "a.jpg", quality=95, subsampling=0), "RGB", SMOOTH, 10, 2.5),
    "L jpeg q95": (lambda d: save(Image.fromarray(GRAY), d / "a.jpg", quality=95), "L", rgb(GRAY), 12, 2.5),
    "CMYK jpeg q95": (lambda d: save(Image.fromarray(SMOOTH).convert("CMYK"), d / "a.jpg", quality=95), "CMYK", SMOOTH, 4, 1.0),
    "YCbCr tiff": (lambda d: save(Image.fromarray(ORIGINAL).convert("YCbCr"), d / "a.tif"), "YCbCr", ORIGINAL, 3, 1.5),
    "LAB tiff": (lambda d: save(Image.fromarray(ORIGINAL).convert("LAB"), d / "a.tif"), "LAB", ORIGINAL, 32, 1.5),
}


@pytest.mark.parametrize("case", list(LOSSY))
def test_lossy_modes_match_pillow_and_stay_close_to_the_original(tmp_path, case):
    write, mode, original, max_err, mean_err = LOSSY[case]
    path = write(tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode
        reference = np.asarray(im.convert("RGB"))
    got = np.asarray(read_rgb8(str(path)))
    np.testing.assert_array_equal(got, reference)
    err = np.abs(got.astype(int) - original)
    assert err.max() <= max_err and err.mean() <= mean_err, (err.max(), err.mean())


def test_hsv_in_memory():
    hsv = Image.fromarray(ORIGINAL).convert("HSV")
    got = np.asarray(to_rgb8(hsv))
    np.testing.assert_array_equal(got, np.asarray(hsv.convert("RGB")))
    assert np.abs(got.astype(int) - ORIGINAL).max() <= 6


def test_loader_and_check_use_the_same_conversion(tmp_path, model_files):
    """A 16-bit PNG reaches the model scaled, not clipped white; the check decodes it with the same function."""
    data = tmp_path / "data"
    (data / "mine" / "test" / "a").mkdir(parents=True)
    path = save(Image.fromarray(G16), data / "mine" / "test" / "a" / "g.png")
    loaded = load_task_data(config_for(data), "mine", (lambda im: im, (0.5,) * 3, (0.25,) * 3, (H, W)))
    np.testing.assert_array_equal(loaded.test_images[0].numpy(), rgb(GRAY))
    assert unreadable_images([str(path)]) == []
