"""``report.md`` of an evaluation: the table, the same prompts and seeds as grids, a bar chart per metric.

Read from the files the evaluation leaves (``results.json``, ``images/``), so a report can be
remade, or made for a finished run, without loading a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from launch import report

HIGHER_IS_BETTER = {"fid_clip": False, "cmmd": False}
GRID_PROMPTS = 6


def _fmt(entry: dict[str, Any]) -> str:
    if "value" in entry:  # a set-level metric
        text = f"{entry['value']:.4g}"
        return text + (f" ± {entry['std']:.2g}" if len(entry.get("per_seed", {})) > 1 else "")
    if entry.get("mean") is None:
        return ""
    text = f"{entry['mean']:.4g}"
    if len(entry.get("per_seed", {})) > 1:
        text += f" ± {entry['std']:.2g}"
    if entry.get("ci95"):
        low, high = entry["ci95"]
        text += f" [{low:.4g}, {high:.4g}]"
    return text


def metric_columns(results: dict[str, dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for metrics in results.values():
        for key in metrics:
            if key not in seen:
                seen.append(key)
    return seen


def results_table(results: dict[str, dict[str, Any]]) -> str:
    columns = metric_columns(results)
    rows = [{"model": name, **{c: _fmt(m[c]) for c in columns if c in m}} for name, m in results.items()]
    arrows = [f"{c} {'↓' if not HIGHER_IS_BETTER.get(c, True) else '↑'}" for c in columns]
    rows = [{"model": r["model"], **{a: r.get(c) for a, c in zip(arrows, columns)}} for r in rows]
    return report.summary_table(rows, ["model", *arrows])


def bar_chart(results: dict[str, dict[str, Any]], metric: str, out_png: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values, low, high = [], [], [], []
    for name, metrics in results.items():
        entry = metrics.get(metric)
        if not entry:
            continue
        value = entry.get("value", entry.get("mean"))
        if value is None:
            continue
        names.append(name)
        values.append(value)
        if entry.get("ci95"):
            low.append(value - entry["ci95"][0])
            high.append(entry["ci95"][1] - value)
        else:
            spread = entry.get("std") or 0.0
            low.append(spread)
            high.append(spread)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(names) + 1), 3.0), dpi=100)
    ax.bar(range(len(names)), values, yerr=[low, high], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    arrow = "↓ better" if not HIGHER_IS_BETTER.get(metric, True) else "↑ better"
    interval = "95% CI" if any(results[n].get(metric, {}).get("ci95") for n in names) else "std over seeds"
    ax.set_title(f"{metric} ({arrow}; bars: {interval})", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def grids(out: Path, rows: Sequence[str], prompts: Sequence[dict], seeds: Sequence[int]) -> list[Path]:
    """One grid per row: the first prompts (rows) × seeds (columns), same cells for every model."""
    from PIL import Image

    chosen = list(prompts)[:GRID_PROMPTS]
    paths = []
    for row in rows:
        cells = []
        for p in chosen:
            line = []
            for seed in seeds:
                with Image.open(out / "images" / row / f"{p['id']}_{seed}.png") as image:
                    line.append(np.asarray(image.convert("RGB")))
            cells.append(line)
        labels = [f"{p['id']}: {p['caption'][:60]}" for p in chosen]
        paths.append(report.image_grid(cells, labels, [f"seed {s}" for s in seeds], out / "grids" / f"{row}.png"))
    return paths


def write_eval_report(out: Path) -> Path:
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results = document["results"]
    settings = document["settings"]
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    seeds = settings["seeds"]
    gen = settings["generation"]
    rows = [r["name"] for r in settings["rows"]]
    sections = []
    described = "; ".join(f"{r['name']} = {r['model']} (subjects: {r['subjects']})" for r in settings["rows"])
    sections.append(("Setup", (
        f"{settings['num_prompts']} prompts × seeds {', '.join(map(str, seeds))}; {gen['scheduler']}, "
        f"{gen['steps']} steps, guidance {gen['guidance']}"
        + (f", subject weight {gen['subject_weight']} ({gen['weighting']})"
           if any(r["subjects"] != "none" for r in settings["rows"]) else "")
        + f".\n\nRows: {described}.\n\nMetric models: "
        + "; ".join(f"{name}: {info.get('model', '')}" for name, info in settings["metrics"].items())
        + ".\n\nEach cell: mean ± std of the per-seed means [95% bootstrap interval over prompts]; "
          "FID_CLIP and CMMD: all images pooled ± std over seeds. Subject recall is our metric (see README).")))
    sections.append(("Results", results_table(results)))
    charts = []
    for metric in metric_columns(results):
        png = bar_chart(results, metric, out / "charts" / f"{metric.replace('@', '_at_')}.png")
        if png:
            charts.append(report.image_link(png, out, metric))
    if charts:
        sections.append(("Charts", "\n".join(charts)))
    grid_links = [f"**{row}**\n\n{report.image_link(p, out, row)}" for row, p in zip(rows, grids(out, rows, prompts, seeds))]
    sections.append(("Same prompts, same seeds", "\n\n".join(grid_links)))
    return report.write_report(out, "Evaluation", sections)
