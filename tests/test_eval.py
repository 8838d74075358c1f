"""safe-jax eval end to end on tiny models: the output contract, resuming without redrawing or
rescoring, refusing to mix settings, bad input as one line; and the pieces (prompts, statistics,
subject recall) on hand-made inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch import eval as eval_cli
from safe_jax.errors import SafeJaxError
from safe_jax.eval import statistics
from safe_jax.eval.prompts import EvalPrompt, Subject, read_prompts, read_prompts_jsonl
from safe_jax.eval.subject_recall import candidate_sets, recall_scores

CAPTIONS = [
    ("flood-1", "Firefighters wade through flood water in Leeds.", [{"text": "Firefighters", "kind": "other"},
                                                                    {"text": "Leeds", "kind": "place"}]),
    ("pm-2", "Boris Johnson speaks at a podium in London.", [{"text": "Boris Johnson", "kind": "person"},
                                                            {"text": "London", "kind": "place"}]),
    ("fire-3", "A warehouse burns near the Capitol.", ["a warehouse", "the Capitol"]),
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from safe_jax.io.clip_folder import init_params, save_clip
    from safe_jax.models.clip_vision import PRESETS, CLIPModel

    folder = tmp_path_factory.mktemp("clip") / "clip"
    model = CLIPModel(PRESETS["tiny"])
    save_clip(model, init_params(model, 3), folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(0)
    with open(root / "prompts.jsonl", "w") as f:
        for pid, caption, subjects in CAPTIONS:
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / f"{pid}.jpg")
            f.write(json.dumps({"id": pid, "caption": caption, "subjects": subjects, "image": f"{pid}.jpg"}) + "\n")
    return root / "prompts.jsonl"


def run_eval(out: Path, prompts: Path, clip: Path, *extra: str) -> int:
    argv = ["--model", "base=tiny", "--model", "other=tiny", "--prompts", str(prompts), "--seeds", "1,2",
            "--steps", "2", "--batch-size", "4", "--clip", str(clip), "--fid-clip", str(clip),
            "--subjects", "none,stored", "--out", str(out), *extra]
    return eval_cli.main(argv)


@pytest.mark.slow
def test_eval_end_to_end_resumes_without_redrawing(tmp_path, prompts_file, clip_dir, capsys):
    out = tmp_path / "eval"
    assert run_eval(out, prompts_file, clip_dir) == 0
    rows = ["base-plain", "base-weighted", "other-plain", "other-weighted"]
    images = sorted(out.glob("images/*/*.png"))
    assert len(images) == len(rows) * len(CAPTIONS) * 2
    # The PNG holds what made it.
    with Image.open(out / "images" / "base-weighted" / "pm-2_2.png") as image:
        settings = json.loads(image.text["parameters"])
    assert settings["seed"] == 2 and settings["subjects"] == ["Boris Johnson", "London"]
    assert settings["steps"] == 2 and settings["subject_weight"] == pytest.approx(1.21)
    # scores.jsonl: one line per image, each per-image metric a number.
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == len(images)
    assert {(r["model"], r["id"], r["seed"]) for r in lines} == {(r, c[0], s) for r in rows for c in CAPTIONS
                                                                 for s in (1, 2)}
    for record in lines:
        assert (out / record["image"]).is_file()
        assert -100.0 <= record["clipscore"] <= 100.0  # torchmetrics: 100·cos per image, unclamped
        assert 0.0 <= record["subject_recall@1"] <= 1.0 and 0.0 < record["subject_mrr"] <= 1.0
    # results.json: per row, per metric: mean, std over seeds, n, CI; FID_CLIP as a set metric.
    results = json.loads((out / "results.json").read_text())["results"]
    assert sorted(results) == sorted(rows)
    clipscore = results["base-plain"]["clipscore"]
    assert clipscore["n"] == 6 and set(clipscore["per_seed"]) == {"1", "2"}
    assert clipscore["ci95"][0] <= clipscore["mean"] <= clipscore["ci95"][1]
    assert np.isclose(clipscore["mean"], np.mean([r["clipscore"] for r in lines if r["model"] == "base-plain"]))
    fid = results["base-plain"]["fid_clip"]
    assert fid["n"] == 6 and fid["value"] > 0 and set(fid["per_seed"]) == {"1", "2"}
    from safe_jax.eval.frechet import FeatureStats, frechet_distance, load_stats

    stats, meta = load_stats(out / "reference_stats" / "fid_clip.npz")  # the real images' mu, sigma, kept
    assert stats.n == len(CAPTIONS) and meta["preprocessing"] == "clean-fid clip_vit_b_32"
    generated = np.load(out / "cache" / "features-fid_clip" / "base-plain.npz")["features"]
    # The cache holds the rows in another order: float32 sums in another order, a few 1e-7 apart.
    assert np.isclose(frechet_distance(FeatureStats.from_features(generated), stats), fid["value"], rtol=1e-5)
    assert "subject_recall@1.person" in results["base-weighted"]
    # Two rows drawn from the same preset, the same seeds and settings: the same pictures.
    for a, b in zip(sorted(out.glob("images/base-plain/*.png")), sorted(out.glob("images/other-plain/*.png"))):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    report = (out / "report.md").read_text()
    assert "| base-plain |" in report and "grids/base-plain.png" in report and "charts/clipscore.png" in report
    assert (out / "grids" / "base-weighted.png").is_file()

    # A re-run draws nothing and scores nothing again.
    times = {p: p.stat().st_mtime_ns for p in images}
    cached = {p: p.read_text() for p in (out / "cache").glob("scores-*.jsonl")}
    capsys.readouterr()
    assert run_eval(out, prompts_file, clip_dir) == 0
    assert "all 6 images already drawn" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in images} == times
    assert {p: p.read_text() for p in (out / "cache").glob("scores-*.jsonl")} == cached

    # A run killed mid-way: one image never written, one half-written temporary file. Only that one
    # image is drawn and scored again.
    victim = out / "images" / "other-weighted" / "fire-3_1.png"
    victim.unlink()
    (victim.parent / ".fire-3_2.png.4242-0a1b2c3d.tmp").write_bytes(b"\x89PNG half")  # as a killed writer leaves it
    assert run_eval(out, prompts_file, clip_dir) == 0
    err = capsys.readouterr().err
    assert "other-weighted: drawing 1 of 6 images (5 already there)" in err
    assert victim.is_file() and not list(victim.parent.glob("*.tmp"))
    assert {p: p.stat().st_mtime_ns for p in images if p != victim} == {p: t for p, t in times.items() if p != victim}

    # Other settings in the same folder: refused, nothing touched.
    assert run_eval(out, prompts_file, clip_dir, "--guidance", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was drawn with guidance=7.5, this run asks 3.0" in err[0]


def test_bad_inputs_are_one_line(tmp_path, prompts_file, clip_dir, capsys):
    cases = [
        (["--metrics", "hps"], "metric hps needs --hps"),
        (["--metrics", "clipscore", "--clip", str(tmp_path / "none")], "--clip"),
        (["--metrics", "imagereward", "--imagereward", str(prompts_file)], "no med_config.json"),
        (["--metrics", "nope"], "unknown nope"),
        (["--seeds", "1,1"], "distinct"),
    ]
    for extra, message in cases:
        argv = ["--model", "tiny", "--prompts", str(prompts_file), "--out", str(tmp_path / "o"), *extra]
        try:
            code = eval_cli.main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
    for spec, message in [(str(tmp_path), "no model_index.json"), ("x=tiny", None)]:
        argv = ["--model", spec, "--model", "x=tiny", "--prompts", str(prompts_file), "--clip", str(clip_dir),
                "--out", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as e:
            eval_cli.parse_args(argv, "safe-jax eval")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (message or "two models named 'x'") in err
    assert not (tmp_path / "o").exists()  # nothing created before the input was checked


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "caption": "x"', "not valid JSON"),
    ('["a"]', "must be a JSON object"),
    ('{"id": "../a", "caption": "x"}', "'id' must be"),
    ('{"id": "a", "caption": ""}', "'caption' must be"),
    ('{"id": "a", "caption": "x", "colour": 1}', "unknown field(s) colour"),
    ('{"id": "a", "caption": "x", "image": "/etc/passwd"}', "must be a path relative"),
    ('{"id": "a", "caption": "x", "image": "../x.jpg"}', "must be a path relative"),
    ('{"id": "a", "caption": "x", "image": "missing.jpg"}', "not a regular file"),
    ('{"id": "a", "caption": "x", "subjects": "Leeds"}', "'subjects' must be a list"),
    ('{"id": "a", "caption": "x", "subjects": [{"text": "Leeds", "kind": "city"}]}', "kind 'city'"),
])
def test_prompt_lines_are_checked_with_their_number(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ok", "caption": "fine"}\n\n' + line + "\n")
    with pytest.raises(SafeJaxError) as e:
        read_prompts_jsonl(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_prompt_images_are_regular_files_inside_the_folder(tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.png").symlink_to(outside)
    os.mkfifo(root / "fifo.png")
    (root / "dup.jsonl").write_text('{"id": "a", "caption": "x"}\n{"id": "a", "caption": "y"}\n')
    with pytest.raises(SafeJaxError, match="already used on line 1"):
        read_prompts_jsonl(root / "dup.jsonl")
    (root / "p.jsonl").write_text('{"id": "a", "caption": "x", "image": "link.png"}\n')
    with pytest.raises(SafeJaxError, match="leads outside"):
        read_prompts_jsonl(root / "p.jsonl")
    # A FIFO passes the listing check but is never read (no hang): refused when opened.
    prompt = EvalPrompt("a", "x", image_path=root / "fifo.png")
    with pytest.raises(SafeJaxError, match="not a regular file"):
        prompt.load_image()


def test_tfds_split_gives_prompts_with_images_and_subjects():
    prompts = read_prompts("anchor/sample:test", limit=4)
    assert len(prompts) == 4 and len({p.id for p in prompts}) == 4
    assert all(p.has_image and p.subjects for p in prompts)
    image = prompts[0].load_image()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3


def test_summarise_means_seed_spread_and_bootstrap():
    values = {("a", 1): 1.0, ("a", 2): 3.0, ("b", 1): 5.0, ("b", 2): 7.0, ("c", 1): float("nan")}
    s = statistics.summarise(values, samples=2000)
    assert s["mean"] == 4.0 and s["n"] == 4
    assert s["per_seed"] == {"1": 3.0, "2": 5.0}
    assert s["std"] == pytest.approx(np.std([3.0, 5.0], ddof=1))
    # Resampling prompts: the mean of a resample is 2, 4 or 6 (a twice, a and b, b twice).
    assert s["ci95"] == [2.0, 6.0]
    assert statistics.summarise(values, samples=2000) == s  # seeded
    assert statistics.summarise({})["mean"] is None


def test_subject_recall_ranks_against_other_captions_subjects():
    prompts = [EvalPrompt(pid, caption, tuple(Subject(s) if isinstance(s, str) else Subject(s["text"], s["kind"])
                                              for s in subjects)) for pid, caption, subjects in CAPTIONS]
    sets = candidate_sets(prompts, distractors=3)
    assert sets == candidate_sets(prompts, distractors=3)  # the same candidates every time
    for prompt in prompts:
        own = {s.text for s in prompt.subjects}
        assert [c.texts[0] for c in sets[prompt.id]] == [s.text for s in prompt.subjects]
        for c in sets[prompt.id]:
            assert len(c.texts) == 4 and not own & set(c.texts[1:])
    # Embeddings: each text its own axis; the image points at one subject's axis.
    vocabulary = sorted({t for v in sets.values() for c in v for t in c.texts})
    axis = {t: np.eye(len(vocabulary))[i] for i, t in enumerate(vocabulary)}
    embed = lambda texts: np.stack([axis[t] for t in texts])  # noqa: E731
    pm = sets["pm-2"]
    image = axis["Boris Johnson"]
    values = recall_scores(image, pm, embed)
    # Boris Johnson ranks first; London ties with all distractors at 0 and so ranks last (4).
    assert values["subject_recall@1"] == 0.5 and values["subject_mrr"] == pytest.approx((1 + 1 / 4) / 2)
    assert values["subject_recall@1.person"] == 1.0 and values["subject_recall@1.place"] == 0.0
    assert recall_scores(image, [], embed) == {}


FIXTURES = Path(__file__).parent / "fixtures" / "reference"


@pytest.mark.slow
def test_eval_every_metric_on_two_model_folders(tmp_path, prompts_file, monkeypatch, capsys):
    """Two diffusers folders (a base and another set of weights), all seven metrics with the small
    checkpoints the reference environment wrote (tests/reference): every output of the contract."""
    import torch

    from safe_jax.io import open_clip as oc
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    state = torch.load(FIXTURES / "open_clip" / "hps_tiny.pt", map_location="cpu", weights_only=True)["state_dict"]
    vision_width, text_width = state["visual.conv1.weight"].shape[0], state["token_embedding.weight"].shape[1]
    monkeypatch.setitem(oc.OPEN_CLIP_ARCHS, "toy", oc.OpenCLIPArch(vision_width, vision_width // 4, text_width, 3))
    for name, seed in (("base", 0), ("tuned", 1)):
        pipe, params = StableDiffusion.from_pretrained("tiny", seed=seed)
        pipe.save_pretrained(params, tmp_path / name)
    clip = FIXTURES / "metrics" / "clip_tiny"
    out = tmp_path / "eval"
    argv = ["--model", str(tmp_path / "base"), "--model", str(tmp_path / "tuned"), "--prompts", str(prompts_file),
            "--limit", "2", "--seeds", "42,371", "--steps", "2", "--batch-size", "2", "--subjects", "stored",
            "--clip", str(clip), "--fid-clip", str(clip), "--pickscore", str(clip), "--cmmd-clip", str(clip),
            "--hps", str(FIXTURES / "open_clip" / "hps_tiny.pt"), "--hps-arch", "toy",
            "--imagereward", str(FIXTURES / "imagereward" / "ImageReward.pt"), "--imagereward-vision", "tiny",
            "--out", str(out)]
    assert eval_cli.main(argv) == 0, capsys.readouterr().err
    per_image = ("clipscore", "pickscore", "hps", "imagereward", "subject_recall@1", "subject_mrr")
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2
    for record in lines:
        assert record["model"] in ("base", "tuned") and record["seed"] in (42, 371)
        assert (out / record["image"]).name == f"{record['id']}_{record['seed']}.png"
        for key in per_image:
            assert np.isfinite(record[key]), (key, record)
    results = json.loads((out / "results.json").read_text())
    for row in ("base", "tuned"):
        for key in per_image:
            assert results["results"][row][key]["n"] == 4
        for key in ("fid_clip", "cmmd"):
            entry = results["results"][row][key]
            assert entry["n"] == 4 and np.isfinite(entry["value"]) and set(entry["per_seed"]) == {"42", "371"}
    # Different weights draw different pictures, so their scores differ.
    assert results["results"]["base"]["hps"]["mean"] != results["results"]["tuned"]["hps"]["mean"]
    assert set(results["settings"]["metrics"]) == {"fid_clip", "clipscore", "pickscore", "hps", "imagereward",
                                                   "cmmd", "subject_recall"}
    report = (out / "report.md").read_text()
    for key in ("fid_clip ↓", "cmmd ↓", "imagereward ↑", "hps ↑"):
        assert key in report


def test_a_model_folder_that_does_not_load_is_one_line_and_keeps_what_was_drawn(tmp_path, prompts_file, clip_dir,
                                                                                   capsys):
    from safe_jax.sampling.stable_diffusion import StableDiffusion

    pipe, params = StableDiffusion.from_pretrained("tiny")
    pipe.save_pretrained(params, tmp_path / "good")
    pipe.save_pretrained(params, tmp_path / "broken")
    config = json.loads((tmp_path / "broken" / "unet" / "config.json").read_text())
    config["norm_num_groups"] = 7
    (tmp_path / "broken" / "unet" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "eval"
    argv = ["--model", str(tmp_path / "good"), "--model", str(tmp_path / "broken"), "--prompts", str(prompts_file),
            "--limit", "1", "--seeds", "1", "--steps", "1", "--batch-size", "1", "--clip", str(clip_dir),
            "--out", str(out)]
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("safe-jax eval: error: --model ") and "norm_num_groups=7" in err[-1]
    assert (out / "images" / "good" / "flood-1_1.png").is_file()  # the first model's image is kept


@pytest.mark.slow
def test_eval_killed_with_sigkill_resumes_without_redrawing(tmp_path, prompts_file):
    """A real kill -9 in the middle of drawing: the re-run keeps every finished image as it was."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "launch.eval", "--model", "tiny", "--prompts", str(prompts_file), "--seeds",
           "1,2,3,4", "--steps", "4", "--batch-size", "1", "--metrics", "fid_clip", "--fid-clip",
           str(FIXTURES / "metrics" / "clip_tiny"), "--out", str(out)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("images/tiny/*.png"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in out.glob("images/tiny/*.png")}
    assert 3 <= len(before) < 12, "the kill should land mid-way"
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"drawing {12 - len(before)} of 12 images ({len(before)} already there)" in done.stderr
    after = {p: p.stat().st_mtime_ns for p in out.glob("images/tiny/*.png")}
    assert len(after) == 12 and all(after[p] == t for p, t in before.items())
    assert not list(out.glob("images/tiny/*.tmp"))
    assert json.loads((out / "results.json").read_text())["results"]["tiny"]["fid_clip"]["n"] == 12


def test_settings_compare_floats_within_rounding():
    """1.1² as the config computes it and 1.21 typed on the command line are one setting; 1.2 is not."""
    from safe_jax.eval.generation import _mismatch

    assert _mismatch({"subject_weight": 1.1 ** 2}, {"subject_weight": 1.21}) is None
    assert "subject_weight" in _mismatch({"subject_weight": 1.2}, {"subject_weight": 1.21})
    assert "steps" in _mismatch({"steps": 15}, {"steps": 20})
