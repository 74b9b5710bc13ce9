"""The distribution ships every package of the source tree (pyproject lists them explicitly,
because the repository folders map onto one import name)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"runtime": "chatterbox_rt", "kernels": "chatterbox_rt.kernels", "export": "chatterbox_rt.export",
           "profiling": "chatterbox_rt.profiling"}


def _listed_packages():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["tool"]["setuptools"]["packages"]), data["tool"]["setuptools"]["package-dir"]


def test_every_source_package_is_listed():
    listed, package_dir = _listed_packages()
    found = set()
    for folder, name in FOLDERS.items():
        assert package_dir[name] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"unlisted: {sorted(found - listed)}; stale: {sorted(listed - found)}"
