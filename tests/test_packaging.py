"""The distribution installs every package folder, in the namespace DESIGN.md promises."""

from __future__ import annotations

import importlib
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[list[str], dict[str, str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return cfg["packages"], cfg["package-dir"]


def test_every_package_folder_is_declared():
    packages, package_dir = _declared()
    found = set()
    for top_name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([top_name, *rel.parts]))
    missing = sorted(found - set(packages))
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_mapped_folders_import_in_the_dystream_namespace():
    packages, package_dir = _declared()
    for name in packages:
        module = importlib.import_module(name)
        top = next(t for t in sorted(package_dir, key=len, reverse=True) if name == t or name.startswith(t + "."))
        expected = (ROOT / package_dir[top]).resolve()
        assert expected in Path(module.__file__).resolve().parents, f"{name} imported from {module.__file__}"
