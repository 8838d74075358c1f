"""The TensorFlow side of the ANCHOR builder: DatasetBuilderTestCase for every config, tfds.load,
and the ``tfds build`` command line. Skipped where TensorFlow is not installed (extra ``tf``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("dill")  # tfds.testing needs it

# The DatasetBuilderTestCase classes live beside the builder, in TFDS's manner; collected here.
from tfds_anchor.anchor.anchor_dataset_builder_test import (  # noqa: E402,F401
    AnchorDefaultTest,
    AnchorEntityTest,
    AnchorSampleTest,
)

ROOT = Path(__file__).resolve().parents[1]
DUMMY = ROOT / "tfds_anchor" / "anchor" / "dummy_data"


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_tfds_load_reads_array_record_into_tf_data(tmp_path, offline_env):
    import tfds_anchor  # noqa: F401

    ds, info = tfds.load("anchor/sample", split="train[:10]", data_dir=str(tmp_path), with_info=True,
                         shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=0))
    examples = list(tfds.as_numpy(ds))
    assert len(examples) == 10 and info.file_format.value == "array_record"
    assert examples[0]["image"].ndim == 3 and examples[0]["image"].shape[2] == 3
    source = tfds.data_source("anchor/sample", split="train[:10]", data_dir=str(tmp_path))
    assert {e["image_id"] for e in examples} == {source[i]["image_id"] for i in range(10)}
    batch = next(iter(tfds.load("anchor/sample", split="test", data_dir=str(tmp_path), batch_size=3)))
    assert batch["caption"].shape == (3,) and batch["ground_truth"].shape == (3,)
    assert all(json.loads(truth)["subjects"] for truth in batch["ground_truth"].numpy())


def test_tfds_build_command_line(tmp_path):
    # tensorflow-datasets' `tfds` script imports these at start-up, whatever the command (extra `tf`).
    pytest.importorskip("apache_beam")
    pytest.importorskip("mlcroissant")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), XDG_CACHE_HOME=str(tmp_path / "c"))
    tfds_cli = Path(sys.executable).with_name("tfds")
    command = [str(tfds_cli)] if tfds_cli.exists() else [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main"]
    proc = subprocess.run(command + ["build", str(ROOT / "tfds_anchor" / "anchor"), "--config", "default",
                                     "--manual_dir", str(DUMMY), "--data_dir", str(tmp_path / "data")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "anchor/default: read 15 records, kept 9" in proc.stdout
    from tfds_anchor.anchor.anchor_dataset_builder import Builder

    built = tmp_path / "data" / "anchor" / "default" / str(Builder.VERSION)
    assert (built / "build_report.json").is_file()
    # The path printed is the final one (not the temporary incomplete.* directory) and exists.
    printed = proc.stdout.split("build report: ", 1)[1].splitlines()[0]
    assert Path(printed).resolve() == (built / "build_report.json").resolve()
    assert any(p.name.startswith("anchor-train.array_record") for p in built.iterdir())
