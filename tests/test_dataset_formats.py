"""Datasets as users keep them (issue #22, part 3): a Hugging Face dataset saved with ``save_to_disk`` and
parquet files, read like the image folders (same decoded images, labels, class names from the features).

Everything is generated here: PNG and JPEG bytes of mixed sizes and modes, written once as class folders
and once as table rows in the same order, so the two readings must agree image for image.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

from merging.errors import DataError
from merging.hashing import FileDigests
from merging.suites.clip.datasets import DatasetTaskData, ImageRows, load_data
from merging.suites.clip.suite import check
from merging.suites.config import load_config

CLASSES = ["circle", "square", "triangle"]
SIZE = 16
TRANSFORM = (Compose([Resize(SIZE, interpolation=InterpolationMode.BICUBIC), CenterCrop(SIZE)]), (0.5,) * 3, (0.25,) * 3, (SIZE, SIZE))
TINY_ARCH = {
    "embed_dim": 8,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def _picture(i: int) -> tuple[bytes, str]:
    """Image ``i``: PNG or JPEG, RGB / L / RGBA, of varying size, with content that depends on ``i``."""
    rng = np.random.default_rng(i)
    w, h = 20 + 3 * i, 18 + 2 * (i % 4)
    mode = ("RGB", "L", "RGBA")[i % 3]
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    fmt = "PNG" if i % 2 == 0 or mode == "RGBA" else "JPEG"
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue(), fmt.lower().replace("jpeg", "jpg")


def _rows(n_per_class: int, start: int = 0) -> list[tuple[bytes, str, int, str]]:
    """(bytes, suffix, label, file name) in the folder reader's order: class folders sorted, files sorted."""
    rows = []
    for label in range(len(CLASSES)):
        for j in range(n_per_class):
            data, suffix = _picture(start + 10 * label + j)
            rows.append((data, suffix, label, f"img{j:02d}.{suffix}"))
    return rows


def _write(root: Path) -> dict[str, list]:
    import datasets

    splits = {"test": _rows(3), "train": _rows(2, start=100)}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    tables = {}
    for split, rows in splits.items():
        for data, _, label, name in rows:
            f = root / "folders" / "shapes" / split / CLASSES[label] / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
        tables[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": r[0], "path": None} for r in rows], "label": [r[2] for r in rows]}, features=features
        )
    datasets.DatasetDict(tables).save_to_disk(str(root / "hf" / "shapes"))
    (root / "pq" / "shapes").mkdir(parents=True)
    tables["test"].to_parquet(str(root / "pq" / "shapes" / "test.parquet"))
    return splits


def _config(root: Path, name: str, **settings) -> Path:
    arch = root / "mergelens-dataset-tiny.json"
    arch.write_text(json.dumps(TINY_ARCH))
    cfg = {"layout": "open_clip", "model": "mergelens-dataset-tiny", "model_config": str(arch), "pretrained": "none.safetensors",
           "finetuned": {"shapes": "none.safetensors"}, "tasks": ["shapes"], **settings}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    splits = _write(root)
    return root, splits


def _load(path: Path) -> DatasetTaskData:
    return load_data(load_config(path), "shapes", TRANSFORM)


@pytest.mark.parametrize("fmt,data_root", [("hf_disk", "hf"), ("parquet", "pq")])
def test_table_datasets_read_like_the_image_folders(tables, fmt, data_root):
    root, splits = tables
    folder = _load(_config(root, "folders", data_root="folders"))
    table = _load(_config(root, fmt, data_root=data_root, data_format=fmt))
    assert isinstance(table, DatasetTaskData) and isinstance(table.test_images, ImageRows)
    assert table.classnames == CLASSES == folder.classnames and table.names_from == "the dataset's features"
    assert table.test_labels.tolist() == [r[2] for r in splits["test"]] == folder.test_labels.tolist()
    got, want = table.test_images[torch.arange(len(table.test_images))], folder.test_images[:]
    assert got.shape == want.shape == (9, SIZE, SIZE, 3) and got.dtype == torch.uint8
    assert torch.equal(got, want)
    assert torch.equal(table.test_images[4], want[4])
    assert table.preprocess(got).shape == (9, 3, SIZE, SIZE)
    assert torch.equal(pickle.loads(pickle.dumps(table.test_images))[1], want[1])  # pickles without its open files
    if fmt == "hf_disk":  # the DatasetDict's train split beside the test split, as a train folder would be
        assert table.train_labels.tolist() == [r[2] for r in splits["train"]] == folder.train_labels.tolist()
        assert torch.equal(table.train_images[:], folder.train_images[:])


def test_digest_follows_the_data_files_bytes(tables, tmp_path):
    import shutil

    root, _ = tables
    data = tmp_path / "pq" / "shapes"
    shutil.copytree(root / "pq" / "shapes", data)
    cfg = _config(tmp_path, "pq", data_root="pq", data_format="parquet")
    first = _load(cfg).digest(FileDigests())
    assert first == _load(cfg).digest(FileDigests())
    import pyarrow.parquet as pq

    t = pq.read_table(data / "test.parquet")
    rows = t.to_pylist()
    rows[0]["image"] = {"bytes": _picture(77)[0], "path": None}
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), data / "test.parquet")
    assert _load(cfg).digest(FileDigests()) != first


def test_parquet_without_features_and_a_limit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(2)
    folder = tmp_path / "pq" / "shapes" / "test"
    folder.mkdir(parents=True)
    for part in range(2):  # two shards, read in name order
        chunk = rows[3 * part : 3 * part + 3]
        pq.write_table(pa.table({"img": [r[0] for r in chunk], "y": pa.array([r[2] for r in chunk], pa.int32())}), folder / f"part{part}.parquet")
    data = _load(_config(tmp_path, "raw", data_root="pq", data_format="parquet", image_column="img", label_column="y", limit=3))
    assert data.classnames == ["0", "1", "2"] and "label numbers" in data.names_from
    assert data.test_labels.tolist() == [0, 1, 2] and data.test_images.rows == [0, 2, 5]
    from merging.suites.clip.images import _decode

    f = tmp_path / "one.png"
    f.write_bytes(rows[5][0])  # in the second shard
    assert torch.equal(data.test_images[2], torch.from_numpy(np.asarray(TRANSFORM[0](_decode(str(f))))))


def test_one_line_errors_for_a_missing_column_and_labels_out_of_range(tables, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = tables
    with pytest.raises(DataError) as e:
        _load(_config(root, "nolabel", data_root="hf", data_format="hf_disk", label_column="fine_label"))
    msg = str(e.value)
    assert "\n" not in msg and "no column 'fine_label'" in msg and "image, label" in msg and "'label_column'" in msg and ".arrow" in msg
    t = pq.read_table(root / "pq" / "shapes" / "test.parquet")
    labels = t.column("label").to_numpy().copy()
    labels[5] = 3
    (tmp_path / "pq" / "shapes").mkdir(parents=True)
    bad = tmp_path / "pq" / "shapes" / "test.parquet"
    pq.write_table(t.set_column(1, "label", pa.array(labels)), bad)
    with pytest.raises(DataError) as e:
        _load(_config(tmp_path, "range", data_root="pq", data_format="parquet"))
    msg = str(e.value)
    assert "\n" not in msg and "label 3 in row 5" in msg and "0..2" in msg and str(bad) in msg and "dataset's features" in msg


def test_suite_check_reports_images_classes_and_label_range(tables, tmp_path):
    root, _ = tables
    report = check(_config(root, "hf_check", data_root="hf", data_format="hf_disk"))
    lines = [m for ok, m in report if ok]
    assert any("shapes: 9 test images, 3 classes (names from the dataset's features), labels 0..2" in m and "(hf_disk)" in m
               and "6 train images beside it" in m for m in lines), report
    assert "shapes: all 9 images decode" in lines, report
    # a damaged image in a row is named by row, not a crash
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(root / "pq" / "shapes" / "test.parquet")
    rows = t.to_pylist()
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    (tmp_path / "pq" / "shapes").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), tmp_path / "pq" / "shapes" / "test.parquet")
    report = check(_config(tmp_path, "pq_check", data_root="pq", data_format="parquet"))
    failed = [m for ok, m in report if not ok and "decoded" in m]
    assert len(failed) == 1 and "test.parquet row 2 (not an image file Pillow can identify)" in failed[0], report


@torch.no_grad()
def test_a_suite_on_table_data_scores_as_on_the_folders(tables, tmp_path, capsys):
    """The whole path (checkpoints, zero-shot heads, lazy rows, fingerprint, cached runs) on each data format: same accuracies."""
    import open_clip
    import pandas as pd
    from safetensors.torch import save_file

    from merging.cli import main
    from merging.suites import get_suite

    root, _ = tables
    _config(root, "arch")  # registers the tiny architecture's JSON
    open_clip.add_model_config(root / "mergelens-dataset-tiny.json")
    torch.manual_seed(5)
    model = open_clip.create_model("mergelens-dataset-tiny", pretrained=None).eval()
    full = model.state_dict()
    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "pre.safetensors")
    tuned = {k[7:]: v + 0.05 * torch.randn_like(v) for k, v in full.items() if k.startswith("visual.")}
    save_file({k: v.contiguous() for k, v in tuned.items()}, tmp_path / "shapes.safetensors")
    tables_out = {}
    for fmt, data_root in (("folders", "folders"), ("hf_disk", "hf"), ("parquet", "pq")):
        cfg = _config(tmp_path, f"e2e_{fmt}", data_root=str(root / data_root), data_format=fmt,
                      pretrained=str(tmp_path / "pre.safetensors"), finetuned={"shapes": str(tmp_path / "shapes.safetensors")})
        csv = tmp_path / f"{fmt}.csv"
        assert main(["table", "--suite", str(cfg), "--methods", "pretrained,individual,task_arithmetic", "--cache-dir", str(tmp_path / "cache"),
                     "--csv", str(csv)]) == 0, capsys.readouterr().err
        capsys.readouterr()
        tables_out[fmt] = pd.read_csv(csv, index_col=0)["shapes"].to_dict()
    assert len(tables_out["folders"]) == 3 and all(0 <= v <= 100 for v in tables_out["folders"].values())
    assert tables_out["hf_disk"] == tables_out["folders"] == tables_out["parquet"], tables_out
    logits = {}  # the accuracies of a random tiny model are coarse: compare the pretrained model's logits image by image
    for fmt in tables_out:
        suite = get_suite(str(tmp_path / f"e2e_{fmt}.yaml"), cache_dir=tmp_path / "cache")
        encoder, head = suite.build_encoder().eval(), suite.heads["shapes"]
        encoder.load_state_dict(suite.pretrained)
        x, y = next(suite.data["shapes"].batches("test", batch_size=64))
        logits[fmt] = encoder(x) @ head["weight"].T + head["bias"]
        assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert logits["folders"].shape == (9, 3) and logits["folders"].std() > 0
    assert torch.equal(logits["hf_disk"], logits["folders"]) and torch.equal(logits["parquet"], logits["folders"])
