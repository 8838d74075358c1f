"""The ANCHOR TFDS builder without TensorFlow: sample (the synthetic world) and manual-dir builds,
ground truth, bad input, the report."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from tfds_anchor.anchor import images, manual, synthetic, world, world_records  # noqa: E402
from tfds_anchor.anchor.anchor_dataset_builder import AnchorConfig, Builder  # noqa: E402
from tfds_anchor.anchor.build_report import BuildReport, NoRecordKept, read_report  # noqa: E402
from tfds_anchor.anchor.sources import normalise_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DUMMY = ROOT / "tfds_anchor" / "anchor" / "dummy_data"

# Run in a fresh interpreter in which `import tensorflow` fails as if it were not installed
# (etils checks with importlib.util.find_spec, so the finders must answer None, not raise).
_HIDE_TENSORFLOW = textwrap.dedent("""
    import sys
    class _Hide:
        def __init__(self, inner): self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf_keras", "keras"):
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None
        def __getattr__(self, attr): return getattr(self.inner, attr)
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
""")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No LLM calls where subjects are found (before the build, or after it); caches stay in tmp."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_build_and_read_without_tensorflow(tmp_path):
    """sample and a manual directory build, and read through tfds.data_source, with TF unimportable."""
    script = _HIDE_TENSORFLOW + textwrap.dedent(f"""
        import json, sys
        import tensorflow_datasets as tfds
        import tfds_anchor
        out = {{}}
        for name, manual in (("anchor/sample", None), ("anchor/default", {str(DUMMY)!r})):
            builder = tfds.builder(name, data_dir={str(tmp_path / "data")!r})
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
            source = tfds.data_source(name, split="train", data_dir={str(tmp_path / "data")!r})
            ex = source[0]
            out[name] = dict(n={{s: len(tfds.data_source(name, split=s, data_dir={str(tmp_path / "data")!r}))
                                for s in ("train", "validation", "test")}},
                             image=list(ex["image"].shape), ground_truth=ex["ground_truth"].decode(),
                             files=sorted(p.name for p in builder.data_path.iterdir()))
        try:
            import tensorflow
            out["tensorflow_importable"] = True
        except ImportError:
            out["tensorflow_importable"] = False
        out["tensorflow_loaded"] = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        print("RESULT" + json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["tensorflow_importable"] is False and out["tensorflow_loaded"] == []
    assert out["anchor/sample"]["n"] == {"train": 270, "validation": 12, "test": 18}
    assert out["anchor/default"]["n"] == {"train": 5, "validation": 2, "test": 2}
    assert json.loads(out["anchor/sample"]["ground_truth"])["subjects"]  # the world's truth travels with it
    assert out["anchor/default"]["ground_truth"] == ""  # real records have none
    for name in ("anchor/sample", "anchor/default"):
        assert out[name]["image"][2] == 3
        assert "build_report.json" in out[name]["files"]
        assert any(f.startswith("anchor-train.array_record") for f in out[name]["files"])
    assert "anchor: read" not in proc.stderr  # the summary goes to stdout
    assert "anchor/default: read 15 records, kept 9" in proc.stdout


def test_tfds_anchor_stands_alone_and_stores_missing_subjects_empty(tmp_path):
    """tfds_anchor imports no safe_jax or launch module, even to build. A record without subjects
    is stored with an empty list, which the input pipeline's ``fill_missing_subjects`` fills offline."""
    data_dir = str(tmp_path / "data")
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow_datasets as tfds
        import tfds_anchor
        for name, manual in (("anchor/sample", None), ("anchor/default", {str(DUMMY)!r})):
            tfds.builder(name, data_dir={data_dir!r}).download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual))
        print("RESULT" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("safe_jax", "launch"))))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("RESULT", 1)[1]) == []

    from safe_jax.data import fill_missing_subjects

    examples = [ex for split in ("train", "validation", "test")
                for ex in tfds.data_source("anchor/default", split=split, data_dir=data_dir)]
    rows = [json.loads(line) for line in (DUMMY / "anchor.jsonl").read_text().splitlines() if line.strip()]
    given = {row["id"]: row.get("subjects") for row in rows}
    stored = [[s.decode() for s in ex["subjects"]] for ex in examples]
    ids = [ex["image_id"].decode() for ex in examples]
    assert any(given.get(i) for i in ids) and any(not given.get(i) for i in ids)
    for i, s in zip(ids, stored):
        assert s == (given.get(i) or [])  # given subjects kept as they are, missing ones empty
    notes = read_report(tfds.builder("anchor/default", data_dir=data_dir).data_path)["notes"]
    assert notes["records without subjects, stored with an empty list (none given, and none in subjects.jsonl)"] \
        == sum(not s for s in stored)
    captions = [ex["caption"].decode() for ex in examples]
    filled = fill_missing_subjects([ex["caption"] for ex in examples], [ex["subjects"] for ex in examples])
    for caption, before, after in zip(captions, stored, filled):
        assert after and all(s.lower() in caption.lower() for s in after)
        if before:
            assert after == before
    sample = tfds.data_source("anchor/sample", split="validation", data_dir=data_dir)
    assert all(len(ex["subjects"]) for ex in sample)  # sample records carry subjects by construction


# ---------------------------------------------------------------------------------- bad records
def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _picture(w=96, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * np.array([1.0, 0.6, 0.3])
    return Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))


def _planted_manual_dir(root: Path) -> tuple[set[str], dict[str, int]]:
    """A manual directory with one record of every bad kind; returns (good ids, expected skips)."""
    (root / "img").mkdir(parents=True)
    files = {
        "rgb.jpg": _jpeg(_picture()),
        "cmyk.jpg": _jpeg(_picture(seed=1).convert("CMYK")),
        "rgba.png": _png(_picture(seed=2).convert("RGBA")),
        "palette.gif": _png(_picture(seed=3).convert("P")),
        "grey.jpg": _jpeg(_picture(seed=4).convert("L")),
        "deep.png": _png(Image.fromarray((np.arange(96 * 64).reshape(64, 96) * 10).astype(np.uint16))),
        "large.jpg": _jpeg(_picture(300, 200, seed=5)),
        "truncated.jpg": _jpeg(_picture(seed=6))[:900],
        "corrupt.jpg": b"<html>404 not found</html>" * 20,
        "tiny.jpg": _jpeg(_picture(20, 16)),
        "bomb.png": _png(Image.new("L", (600, 500))),
    }
    rotated = _picture(64, 96, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    files["rotated.jpg"] = _jpeg(rotated, exif=exif)
    for name, data in files.items():
        (root / "img" / name).write_bytes(data)
    cap = "Firefighters tackle a blaze near Tower Bridge in London."
    rows = [
        {"id": "good-rgb", "caption": cap, "source": "The Guardian", "image": "img/rgb.jpg", "split": "train",
         "extra": {"anything": [1, 2]}},
        {"id": "good-cmyk", "caption": cap, "source": "BBC News", "image": "img/cmyk.jpg", "split": "train"},
        {"id": "good-rgba", "caption": cap, "source": "usatoday", "image": "img/rgba.png", "split": "validation"},
        {"id": "good-palette", "caption": cap, "source": "WaPo", "image": "img/palette.gif", "split": "test"},
        {"id": "good-grey", "caption": cap, "source": "NYT", "image": "img/grey.jpg", "split": "train"},
        {"id": "good-16bit", "caption": cap, "source": "Reuters", "image": "img/deep.png", "split": "train"},
        {"id": "good-large", "caption": cap, "source": "bbc", "image": "img/large.jpg", "split": "train",
         "subjects": ["Firefighters", "Tower Bridge"]},
        {"id": 12345, "caption": "  Crowds   wait\nfor the parade in Leeds. ", "source": None, "image": "img/rotated.jpg",
         "split": "dev"},
        {"id": "bad-missing", "caption": cap, "source": "bbc", "image": "img/nowhere.jpg"},
        {"id": "bad-noimage", "caption": cap, "source": "bbc"},
        {"id": "bad-truncated", "caption": cap, "source": "bbc", "image": "img/truncated.jpg"},
        {"id": "bad-corrupt", "caption": cap, "source": "bbc", "image": "img/corrupt.jpg"},
        {"id": "bad-tiny", "caption": cap, "source": "bbc", "image": "img/tiny.jpg"},
        {"id": "bad-bomb", "caption": cap, "source": "bbc", "image": "img/bomb.png"},
        {"id": "bad-empty", "caption": "", "source": "bbc", "image": "img/rgb.jpg"},
        {"id": "bad-blank", "caption": " \n\t", "source": "bbc", "image": "img/rgb.jpg"},
        {"id": "bad-nocaption", "source": "bbc", "image": "img/rgb.jpg"},
        {"id": "bad-path", "caption": cap, "source": "bbc", "image": "../outside.jpg"},
        {"id": "good-rgb", "caption": "a duplicate id", "source": "bbc", "image": "img/rgb.jpg"},
        {"caption": cap, "source": "bbc", "image": "img/rgb.jpg"},
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines.append(b'{"id": "bad-bytes", "caption": "Caf\xe9 owners in Leeds", "image": "img/rgb.jpg"}')  # Latin-1
    lines.append(b'{"id": "bad-json", "caption": "unterminated')
    lines.append(b'["a", "list", "not an object"]')
    lines.append(b"")
    (root / "anchor.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    good = {"good-rgb", "good-cmyk", "good-rgba", "good-palette", "good-grey", "good-16bit", "good-large", "12345"}
    skips = {"missing_image": 2, "truncated_image": 1, "corrupt_image": 1, "tiny_image": 1, "too_large_image": 1,
             "empty_caption": 3, "unsafe_image_path": 1, "duplicate_id": 1, "missing_id": 1, "non_utf8_caption": 1,
             "malformed_line": 2}
    return good, skips


def test_bad_records_are_counted_and_good_ones_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # bomb.png (300K pixels) is then over twice the limit
    from launch.subjects import main as subjects_cli

    good, skips = _planted_manual_dir(tmp_path / "manual")
    # The step before the build: subjects of the records without any, into manual/subjects.jsonl.
    assert subjects_cli(["--manual-dir", str(tmp_path / "manual"), "--backend", "offline", "--quiet"]) == 0
    assert (tmp_path / "manual" / "subjects.jsonl").is_file()
    capsys.readouterr()
    config = AnchorConfig(name="planted", subset="non_entity", max_side=128, min_side=32)
    builder = Builder(config=config, data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))

    report = read_report(builder.data_path)
    assert report["skipped"] == skips
    assert report["notes"]["records with subjects from subjects.jsonl"] == len(good) - 1  # good-large has its own
    assert report["records_read"] == 23  # the blank line is not a record
    assert report["kept_total"] == len(good)
    assert set(report["converted_to_rgb"]) == {"CMYK", "RGBA", "P", "L", "I;16"}
    assert report["skipped_examples"]["truncated_image"] == ["bad-truncated"]
    printed = capsys.readouterr().out
    assert "skipped      1  too_large_image" in printed and "kept 8" in printed
    # The report's path is the final one, not the temporary build directory TFDS renamed.
    assert builder.report_path == builder.data_path / "build_report.json" and builder.report_path.is_file()
    assert f"build report: {builder.report_path}" in printed and "incomplete" not in str(builder.report_path)

    seen = {}
    for split in ("train", "validation", "test"):
        for ex in builder.as_data_source(split=split):
            seen[ex["image_id"].decode()] = (split, ex)
    assert set(seen) == good
    split, rotated = seen["12345"]
    assert split == "validation"  # "dev"
    assert rotated["image"].shape == (64, 96, 3)  # stored upright: 64×96 portrait turned by EXIF
    assert rotated["caption"] == b"Crowds wait for the parade in Leeds."
    assert seen["good-large"][1]["image"].shape == (85, 128, 3)  # longest side capped
    assert [s.decode() for s in seen["good-large"][1]["subjects"]] == ["Firefighters", "Tower Bridge"]
    names = builder.info.features["source"].names
    assert names[seen["good-cmyk"][1]["source"]] == "bbc"
    assert names[seen["good-16bit"][1]["source"]] == "other"
    for _, ex in seen.values():
        assert ex["image"].ndim == 3 and ex["image"].shape[2] == 3
        assert ex["subjects"], "given, or found before the build by `safe-jax subjects --manual-dir`"
        caption = ex["caption"].decode()
        assert all(s.decode().lower() in caption.lower() for s in ex["subjects"])
    cmyk = seen["good-cmyk"][1]["image"].astype(float)
    assert cmyk[:, -8:, 0].mean() > cmyk[:, :8, 0].mean() + 100  # colours survived CMYK → RGB


def test_csv_manual_dir_and_entity_config(tmp_path):
    root = tmp_path / "manual"
    (root / "images").mkdir(parents=True)
    rows = []
    for r in world_records.pairs(12, seed=3):
        (root / "images" / f"{r.id}.jpg").write_bytes(r.image_bytes)
        subjects = json.dumps(r.subjects) if len(rows) % 2 else "; ".join(r.subjects)
        # Every world picture shows a named person; a third of the rows name one as ANCHOR Entity does.
        entity = r.entity if len(rows) % 3 == 0 else ""
        rows.append([r.id, r.caption, r.source, f"images/{r.id}.jpg", subjects, entity, "train"])
    import csv

    with open(root / "anchor.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "caption", "source", "image", "subjects", "entity", "split", "unused"])
        writer.writerows(rows)
    with_entity = {r[0] for r in rows if r[5]}
    assert 0 < len(with_entity) < len(rows)
    data_dir = str(tmp_path / "data")
    for config, expected in (("entity", with_entity), ("default", {r[0] for r in rows} - with_entity)):
        builder = tfds.builder(f"anchor/{config}", data_dir=data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
        examples = list(builder.as_data_source(split="train"))
        assert {e["image_id"].decode() for e in examples} == expected
        for e in examples:
            row = next(r for r in rows if r[0] == e["image_id"].decode())
            assert e["entity"].decode() == (row[5] if config == "entity" else "")
            want = json.loads(row[4]) if row[4].startswith("[") else [s.strip() for s in row[4].split(";")]
            assert [s.decode() for s in e["subjects"]] == want
        assert read_report(builder.data_path)["notes"]  # the other subset's records are noted, not skipped


def test_build_keeping_no_record_fails_naming_the_reasons(tmp_path, capsys, caplog):
    """Every line lacks an id: the build fails at once, says why, and leaves no 'prepared' dataset."""
    root = tmp_path / "manual"
    root.mkdir()
    (root / "anchor.jsonl").write_text("".join(json.dumps({"caption": "A fire in Leeds.", "image": f"{i}.jpg"}) + "\n"
                                               for i in range(30)))
    data_dir = tmp_path / "data"
    config = tfds.download.DownloadConfig(manual_dir=str(root))
    builder = tfds.builder("anchor/default", data_dir=str(data_dir))
    with pytest.raises(NoRecordKept) as e:
        builder.download_and_prepare(download_config=config)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    assert message.startswith(f"anchor/default: no record kept from {root}: 30 records were skipped for missing_id")
    failed = data_dir / "anchor" / "default" / f"build_report-{Builder.VERSION}-failed.json"
    assert str(failed) in message and json.loads(failed.read_text())["skipped"] == {"missing_id": 30}
    assert not builder.data_path.exists()  # nothing claims to be prepared
    assert sorted(p.name for p in failed.parent.iterdir()) == [failed.name]  # no incomplete.* left either
    assert "kept 0 (none), skipped 30" in capsys.readouterr().out

    # Fixed: three good records, all in train. Builds (other splits absent, with a warning), and the
    # stale failure report is gone.
    (root / "images").mkdir()
    lines = []
    for r in world_records.pairs(3, seed=1):
        (root / "images" / f"{r.id}.jpg").write_bytes(r.image_bytes)
        lines.append(json.dumps({"id": r.id, "caption": r.caption, "image": f"images/{r.id}.jpg", "split": "train"}))
    (root / "anchor.jsonl").write_text("\n".join(lines) + "\n")
    builder = tfds.builder("anchor/default", data_dir=str(data_dir))
    with caplog.at_level("INFO", logger="tfds_anchor"):
        builder.download_and_prepare(download_config=config)
    assert not failed.exists() and builder.report_path.is_file()
    assert "no record in split 'validation'" in caplog.text
    assert f"build report: {builder.report_path}" in caplog.text
    assert read_report(builder.data_path)["notes"]["split 'test' has no record and is not in the dataset"] == 1
    assert len(builder.as_data_source(split="train")) == 3

    # The entity config of the same directory: every record is of the other subset.
    with pytest.raises(NoRecordKept, match=r"anchor/entity: no record kept .*: 3 records of the other subset"):
        tfds.builder("anchor/entity", data_dir=str(data_dir)).download_and_prepare(download_config=config)


def test_missing_manual_dir_metadata_is_a_clear_error(tmp_path):
    (tmp_path / "manual").mkdir()
    builder = tfds.builder("anchor/default", data_dir=str(tmp_path / "data"))
    config = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual"))
    with pytest.raises(AssertionError, match="Zenodo"):  # TFDS's own check: the instructions are shown
        builder.download_and_prepare(download_config=config)
    (tmp_path / "manual" / "notes.txt").write_text("images are coming")
    with pytest.raises(FileNotFoundError, match="anchor.jsonl"):
        builder.download_and_prepare(download_config=config)


# ---------------------------------------------------------------------------------- pieces
def test_image_preparation():
    rgb = _jpeg(_picture())
    assert images.prepare(rgb, max_side=128, min_side=32, quality=90).jpeg == rgb  # passed through as is
    big = images.prepare(_jpeg(_picture(1200, 800)), max_side=300, min_side=32, quality=90)  # via DCT draft
    assert (big.width, big.height) == (300, 200) and big.reencoded
    assert Image.open(io.BytesIO(big.jpeg)).mode == "RGB"
    rgba = _picture().convert("RGBA")
    rgba.putalpha(0)  # fully transparent: flattened onto white
    out = np.asarray(Image.open(io.BytesIO(images.prepare(_png(rgba), max_side=128, min_side=32, quality=95).jpeg)))
    assert out.min() > 240
    for bad, reason in ((rgb[: len(rgb) // 2], "truncated_image"), (b"GIF89a" + b"\0" * 50, "corrupt_image"),
                        (_jpeg(_picture(20, 20)), "tiny_image")):
        with pytest.raises(images.BadImage) as e:
            images.prepare(bad, max_side=128, min_side=32, quality=90)
        assert e.value.reason == reason
        with pytest.raises(images.BadImage) as e:
            images.check(bad, min_side=32)
        assert e.value.reason == reason


def test_sources_splits_and_report_helpers():
    assert normalise_source("The Guardian") == "the_guardian"
    assert normalise_source("  washington-post ") == "washington_post"
    assert normalise_source("NYTimes") == "new_york_times"
    assert normalise_source("Al Jazeera") == "other" and normalise_source(None) == "other"
    splits = [manual.hash_split(f"id-{i}") for i in range(4000)]
    assert manual.hash_split("id-7") == manual.hash_split("id-7")
    assert 0.87 < splits.count("train") / 4000 < 0.93 and splits.count("test") > 100
    report = BuildReport(config="x")
    report.skip("tiny_image", "a")
    with pytest.raises(ValueError):
        report.skip("no such reason")
    assert report.to_json()["skipped"] == {"tiny_image": 1}


def test_sample_is_the_world_with_its_ground_truth(tmp_path):
    """Every stored sample record is world record (seed 0, index): its caption and scene as drawn
    from those alone, its split the combination's, its ground truth JSON naming its subjects."""
    builder = tfds.builder("anchor/sample", data_dir=str(tmp_path / "data"))
    builder.download_and_prepare()
    counts = {}
    for split in ("train", "validation", "test"):
        source = builder.as_data_source(split=split)
        counts[split] = len(source)
        for ex in source:
            truth = json.loads(ex["ground_truth"].decode())
            subjects = [s.decode() for s in ex["subjects"]]
            caption = ex["caption"].decode()
            assert subjects and subjects == [s["text"] for s in truth["subjects"]]
            assert all(caption[s["start"]:s["end"]] == s["text"] for s in truth["subjects"])
            assert {s["kind"] for s in truth["subjects"]} <= {"person", "place", "other"}
            assert split == world.combination_split(truth["spec"])
            assert ex["image"].shape == (128, 128, 3) and truth["size"] == [128, 128]  # square, no portraits
            index = int(ex["image_id"].decode().removeprefix("world-0-"))
            drawn = world.example(0, index, 128)
            assert drawn["caption"] == caption and drawn["spec"] == truth["spec"] and drawn["split"] == split
    assert counts == {"train": 270, "validation": 12, "test": 18} == world_records.split_counts(300, 0)
    held_out = [world.combination(json.loads(ex["ground_truth"])["spec"])
                for split in ("validation", "test") for ex in builder.as_data_source(split=split)]
    trained = {world.combination(json.loads(ex["ground_truth"])["spec"]) for ex in builder.as_data_source(split="train")}
    assert held_out and not trained & set(held_out)  # held-out captions name combinations never trained on
    # The evaluation's prompts take each subject's kind from the truth, for per-kind subject recall.
    from safe_jax.eval.prompts import read_prompts_tfds

    prompts = read_prompts_tfds("anchor/sample:test", str(tmp_path / "data"))
    truths = {ex["image_id"].decode(): json.loads(ex["ground_truth"]) for ex in builder.as_data_source(split="test")}
    assert len(prompts) == 18
    for p in prompts:
        assert [(s.text, s.kind) for s in p.subjects] == [(s["text"], s["kind"]) for s in truths[p.id]["subjects"]]
    assert {s.kind for p in prompts for s in p.subjects} == {"person", "place", "other"}


def test_synthetic_config_and_a_small_world_with_portraits(tmp_path):
    """``synthetic`` is the same world, larger (not built here: 20,000 records); a config of the
    same subset with few records builds, streams its splits and turns every fifth picture portrait."""
    configs = {c.name: c for c in Builder.BUILDER_CONFIGS}
    big, sample = configs["synthetic"], configs["sample"]
    assert (big.subset, big.synthetic_examples, big.synthetic_size, big.synthetic_seed, big.synthetic_portrait_every) \
        == ("synthetic", 20_000, (128, 128), 0, 0)
    assert (sample.subset, sample.synthetic_examples, sample.synthetic_size, sample.synthetic_portrait_every) \
        == ("synthetic", 300, (128, 128), 0)
    assert "pretraining" in big.description
    config = AnchorConfig(name="world40", subset="synthetic", synthetic_examples=40, synthetic_size=(96, 64),
                          synthetic_seed=5, synthetic_portrait_every=5, min_side=32)
    builder = Builder(config=config, data_dir=str(tmp_path / "data"))
    builder.download_and_prepare()
    expected = world_records.split_counts(40, 5)
    assert {s: len(builder.as_data_source(split=s)) for s in builder.info.splits} == expected
    shapes = {}
    for split in expected:
        for ex in builder.as_data_source(split=split):
            shapes[int(ex["image_id"].decode().split("-")[-1])] = ex["image"].shape
            assert json.loads(ex["ground_truth"])["size"] == [ex["image"].shape[1], ex["image"].shape[0]]
    assert sorted(shapes) == list(range(40))
    assert all(shape == ((96, 64, 3) if i % 5 == 0 else (64, 96, 3)) for i, shape in shapes.items())
    assert read_report(builder.data_path)["records_read"] == 40
    with pytest.raises(ValueError, match="synthetic_portrait_every"):
        AnchorConfig(name="bad", subset="synthetic", synthetic_portrait_every=-1)


def test_manual_dir_of_the_world_builds_without_ground_truth(tmp_path):
    """A manual directory (as real ANCHOR is read) stores ground_truth "": the truth is the world's
    alone, and a directory of world pictures is read as any other."""
    rows = synthetic.write_manual_dir(tmp_path / "manual", 12, seed=2, subjects=True, entities=False)
    assert len(rows) == 12 and not any("entity" in row or "split" in row for row in rows)
    builder = Builder(config=AnchorConfig(name="from_files", subset="non_entity", min_side=32),
                      data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
    given = {row["id"]: row for row in rows}
    stored = [ex for split in builder.info.splits for ex in builder.as_data_source(split=split)]
    assert sorted(ex["image_id"].decode() for ex in stored) == sorted(given)
    for ex in stored:
        row = given[ex["image_id"].decode()]
        assert ex["ground_truth"] == b"" and ex["entity"] == b""
        assert ex["caption"].decode() == row["caption"] and [s.decode() for s in ex["subjects"]] == row["subjects"]
    assert {ex["image"].shape for ex in stored} == {(128, 192, 3), (192, 128, 3)}  # one in five portrait
