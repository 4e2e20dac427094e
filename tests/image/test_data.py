"""Reading imagefolder datasets: captions and trigger, the held-out split, every bad-image case with real broken files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from polyadapt.config import load_config
from polyadapt_image.data import apply_trigger, load_image


def load(config_path: Path):
    from .conftest import load_data

    return load_data(load_config(config_path))


@pytest.mark.parametrize(
    ("caption", "trigger", "position", "expected"),
    [
        ("a gold anchor", "in harbor style", "suffix", "a gold anchor, in harbor style"),
        ("a gold anchor", "in harbor style", "prefix", "in harbor style, a gold anchor"),
        ("a gold anchor In Harbor Style", "in harbor style", "suffix", "a gold anchor In Harbor Style"),
        ("  a gold anchor  ", None, "suffix", "a gold anchor"),
    ],
)
def test_trigger_rule(caption, trigger, position, expected):
    assert apply_trigger(caption, trigger, position) == expected


def test_reads_splits_with_trigger(make_config):
    splits = load(make_config())
    assert len(splits.train) == 8 and len(splits.validation) == 4
    assert not splits.problems
    assert all(s.caption.endswith(", in harbor style") for s in [*splits.train, *splits.validation])
    assert splits.train[0].key.endswith("train/img-0.png")
    assert any(f.name == "metadata.jsonl" for f in splits.files)
    assert splits.heldout == {"source": "test"}


def test_holdout_cut_when_no_test_split(make_config, dataset):
    import shutil

    shutil.rmtree(dataset / "test")
    first = load(make_config(data={"path": str(dataset), "holdout": 0.25}))
    second = load(make_config(data={"path": str(dataset), "holdout": 0.25}))
    assert len(first.validation) == 2 and len(first.train) == 6
    assert [s.key for s in first.validation] == [s.key for s in second.validation]
    assert first.heldout["source"] == "holdout" and len(first.heldout["indices"]) == 2


def test_a_validation_split_is_the_held_out_one_before_test(make_config, dataset):
    import shutil

    shutil.copytree(dataset / "test", dataset / "validation")
    (dataset / "validation" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img-0.png", "text": "a gold circle on a teal background"}) + "\n"
    )
    splits = load(make_config(data={"path": str(dataset)}))
    assert splits.heldout == {"source": "validation"}
    assert [s.key for s in splits.validation] == [str(dataset / "validation" / "img-0.png")]
    assert len(splits.train) == 8


def test_only_a_held_out_split_gives_an_empty_train_and_no_split_is_the_core_error(make_config, dataset):
    import shutil

    from polyadapt.errors import DataError

    shutil.rmtree(dataset / "train")
    splits = load(make_config(data={"path": str(dataset)}))
    assert not splits.train and len(splits.validation) == 4
    shutil.rmtree(dataset / "test")
    with pytest.raises(DataError, match="holds no dataset .*train/metadata.jsonl"):
        load(make_config(data={"path": str(dataset)}))


def test_the_demo_data_has_train_and_test_only():
    """The demo's held-out split is its test/ directory: there is no validation/ to take its place."""
    root = Path(__file__).resolve().parents[2] / "sample_data" / "image"
    assert sorted(p.parent.name for p in root.glob("*/metadata.jsonl")) == ["test", "train"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height``, with a few bytes of pixel data (a tiny file)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def truncated_png(path: Path) -> None:
    Image.new("RGB", (32, 32), (10, 200, 30)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CASES = [
    # (name, how to make the file (or None), metadata record, expected words in the reason)
    ("missing.png", None, {"file_name": "missing.png", "text": "x"}, "file not found"),
    ("zero.png", lambda p: p.write_bytes(b""), {"file_name": "zero.png", "text": "x"}, "zero-size"),
    ("text.png", lambda p: p.write_text("hello, not a picture"), {"file_name": "text.png", "text": "x"}, "not an image"),
    ("cut.png", truncated_png, {"file_name": "cut.png", "text": "x"}, "truncated"),
    ("bomb.png", lambda p: p.write_bytes(png_header_only(30000, 30000)), {"file_name": "bomb.png", "text": "x"}, "decompression-bomb"),
    ("nocaption.png", lambda p: Image.new("RGB", (8, 8)).save(p), {"file_name": "nocaption.png"}, "missing caption"),
    ("empty.png", lambda p: Image.new("RGB", (8, 8)).save(p), {"file_name": "empty.png", "text": "  "}, "missing caption"),
    ("../escape.png", None, {"file_name": "../escape.png", "text": "x"}, "escapes the dataset directory"),
]  # fmt: skip


def test_every_bad_image_is_named_with_its_reason(make_config, dataset):
    train = dataset / "train"
    (dataset / "escape.png").write_bytes(b"")  # exists, but outside train/
    rows = [json.loads(line) for line in (train / "metadata.jsonl").read_text().splitlines()]
    for name, make, record, _ in BAD_CASES:
        if make is not None:
            make(train / name)
        rows.append(record)
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"text": "no file name"})]
    (train / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    before = sorted(p.name for p in train.iterdir())

    splits = load(make_config())

    assert len(splits.train) == 8, "the good samples are still read"
    by_file = {Path(p.file).name: p for p in splits.problems}
    for name, _, _, words in BAD_CASES:
        problem = by_file[Path(name).name]
        assert words in problem.reason, (name, problem.reason)
        assert problem.line is not None
    reasons = [p.reason for p in splits.problems]
    assert any("invalid JSON" in r for r in reasons)
    assert any("missing 'file_name'" in r for r in reasons)
    assert len(splits.problems) == len(BAD_CASES) + 2
    assert sorted(p.name for p in train.iterdir()) == before, "no user file is touched"


def test_doctor_lists_bad_files_and_exits_2(make_config, dataset):
    from polyadapt.cli import cli

    (dataset / "train" / "zero.png").write_bytes(b"")
    with open(dataset / "train" / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "zero.png", "text": "x"}) + "\n")
    result = CliRunner().invoke(cli, ["doctor", str(make_config())])
    assert result.exit_code == 2
    assert "train/zero.png:9: zero-size file" in result.output


@pytest.mark.parametrize(
    ("mode", "size", "center"),
    [
        ("RGB", (40, 20), True),
        ("RGBA", (20, 40), False),
        ("L", (16, 16), True),
        ("P", (33, 17), True),
        ("I;16", (18, 30), True),
    ],
)
def test_any_mode_and_size_becomes_rgb_square(tmp_path, mode, size, center):
    import random

    path = tmp_path / "x.png"
    Image.new(mode, size).save(path)
    image = load_image(path, 16, center_crop=center, rng=random.Random(0))
    assert image.mode == "RGB" and image.size == (16, 16)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert load_image(path, 8, True).getpixel((4, 4)) == (255, 255, 255)
