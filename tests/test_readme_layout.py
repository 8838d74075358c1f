"""README.md's "Layout" block matches the tree, both ways: every path it names exists, and every
module of safe_jax/, launch/ and tfds_anchor/ is named in it (a new module must get its line)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("safe_jax", "launch", "tfds_anchor")
# Folders the layout names as a whole (one line for the folder, its files in the description).
WHOLE_FOLDERS = ("launch/configs/",)


def layout_paths() -> list[str]:
    """The repository paths the Layout block names, in order.

    Each line is ``<path>  <description>``, indented two spaces per level. A path ending in ``/``
    is a folder, and the lines indented below it are relative to it.
    """
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n+```\n(.*?)^```", readme, re.S | re.M)
    assert match, "README.md has no '## Layout' section with a code block"
    paths, parents = [], []  # parents: (indent, folder path) of the enclosing folders
    for number, line in enumerate(match.group(1).splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"Layout line {number}: indent by two spaces a level: {line!r}"
        while parents and parents[-1][0] >= indent:
            parents.pop()
        assert indent == 2 * len(parents), f"Layout line {number}: indented deeper than its folder: {line!r}"
        name = line.split()[0]
        path = (parents[-1][1] if parents else "") + name
        paths.append(path)
        if name.endswith("/"):
            parents.append((indent, path))
    return paths


def test_every_path_in_the_layout_exists():
    paths = layout_paths()
    assert len(paths) == len(set(paths)), f"named twice: {sorted(p for p in paths if paths.count(p) > 1)}"
    missing = [p for p in paths if not ((ROOT / p).is_dir() if p.endswith("/") else (ROOT / p).is_file())]
    assert not missing, f"README.md's Layout names paths that are not in the repository: {missing}"


def test_every_module_is_in_the_layout():
    named = set(layout_paths())
    for folder in WHOLE_FOLDERS:
        assert folder in named, f"README.md's Layout should name the folder {folder}"
    modules = sorted(
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    )
    unnamed = [m for m in modules if m not in named and not m.startswith(WHOLE_FOLDERS)]
    assert not unnamed, f"add a line for each of these modules to README.md's Layout block: {unnamed}"
    folders = {str(Path(m).parent.as_posix()) + "/" for m in modules}
    assert not folders - named, f"README.md's Layout should name these folders: {sorted(folders - named)}"
