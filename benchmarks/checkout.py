"""Make facecore and its bundled plugins importable from a plain checkout, without ``pip install``.

For machines where the project cannot be installed (a lent GPU machine with no network, say).
When the facecore distribution is installed, nothing happens. Otherwise :func:`ensure_importable`
builds a folder that looks like an installed copy -- links named as pyproject's
``[tool.setuptools.package-dir]`` maps them (``facecore``, ``facecore_plugins`` ->
``plugins/``, ``facecore_schemas`` -> ``schemas/``) and a ``facecore-<version>.dist-info`` whose
``entry_points.txt`` is pyproject's ``[project.entry-points.facecore]`` table -- and puts it
first on ``sys.path``. The bundled plugins then load through the entry-point path, exactly as
in an installed package; nothing here names a plugin.

    python3 benchmarks/checkout.py      # prints that folder: PYTHONPATH=$(...) for other processes
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUP = "facecore"


def _is_installed() -> bool:
    """Whether an installed facecore distribution provides the entry points."""
    try:
        dist = importlib.metadata.distribution("facecore")
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(ep.group == GROUP for ep in dist.entry_points)


def _pyproject(repo: Path) -> dict:
    """The parts of pyproject.toml used here: version, package-dir and the facecore entry points."""
    text = (repo / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the three tables are flat "key = \"value\"" lines
        return _parse_flat_tables(text)
    data = tomllib.loads(text)
    return {
        "version": data["project"]["version"],
        "package_dir": data["tool"]["setuptools"]["package-dir"],
        "entry_points": data["project"]["entry-points"][GROUP],
    }


def _parse_flat_tables(text: str) -> dict:
    tables: dict[str, dict[str, str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[]").strip()
        elif "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            if re.fullmatch(r'"[^"]*"', value):
                tables.setdefault(section, {})[key.strip('"')] = value.strip('"')
    return {
        "version": tables["project"]["version"],
        "package_dir": tables["tool.setuptools.package-dir"],
        "entry_points": tables[f"project.entry-points.{GROUP}"],
    }


def site_folder(repo: Path = REPO) -> Path:
    """Where the import folder for ``repo`` goes (one per checkout, under the temp dir)."""
    tag = hashlib.sha1(str(repo.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"facecore-checkout-{tag}"


def build_site(repo: Path = REPO, folder: Path | None = None) -> Path:
    """Write the links and the dist-info for ``repo`` into ``folder`` (replacing what is there)."""
    meta = _pyproject(repo)
    folder = folder or site_folder(repo)
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in meta["package_dir"].items():
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(repo / source, target_is_directory=True)
    for old in folder.glob("facecore-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = folder / f"facecore-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: facecore\nVersion: {meta['version']}\n")
    lines = [f"[{GROUP}]"] + [f"{name} = {target}" for name, target in meta["entry_points"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return folder


def ensure_importable(repo: Path = REPO) -> Path | None:
    """Make ``import facecore`` and its entry points work; the folder put on sys.path, or None if installed."""
    if _is_installed():
        return None
    folder = build_site(repo)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    return folder


if __name__ == "__main__":
    found = None if _is_installed() else build_site()
    print(found or "")
