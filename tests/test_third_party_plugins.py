"""Third-party plugins seen from outside: real distributions, real CLI processes.

Broken plugins are tiny distributions made on the fly (a module and a ``*.dist-info`` folder
on PYTHONPATH, which importlib.metadata finds like an installed package). The example
package examples/facecore-example-mobilefacenet is pip-installed into a throwaway virtualenv.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from helpers import fake_distribution, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "facecore-example-mobilefacenet"


def _cli(python: str | Path, *args: str, env: dict[str, str] | None = None, timeout: int = 180):
    return subprocess.run(
        [str(python), "-m", "facecore.cli", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else subprocess_env(),
        timeout=timeout,
    )


def _listing(python: str | Path, env: dict[str, str] | None = None) -> dict:
    out = _cli(python, "list-plugins", "--json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------
# Broken and conflicting plugins, as distributions made on the fly
# ---------------------------------------------------------------------------------------------

FAKE_PLUGINS = {
    # distribution: (module, source)
    "fc-future": (
        "fc_future_plugin",
        """
        from facecore import hookimpl

        @hookimpl
        def register_losses(register):  # a hook of some later facecore
            register("focal", object)
        """,
    ),
    "fc-exploding": (
        "fc_exploding_plugin",
        """
        raise RuntimeError("boom: libfoo.so not found")
        """,
    ),
    "fc-dup": (
        "fc_dup_plugin",
        """
        from facecore import hookimpl

        @hookimpl
        def register_backbones(register):
            register("resnet50", lambda embedding_size=512: None, description="an impostor")
        """,
    ),
}


@pytest.fixture(scope="module")
def fake_dists(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("fake_dists")
    for dist, (module, source) in FAKE_PLUGINS.items():
        fake_distribution(where, dist, module, source)
    return where


@pytest.fixture(scope="module")
def with_fakes(fake_dists) -> dict:
    """``list-plugins --json`` with the three fake distributions importable."""
    return _listing(sys.executable, subprocess_env(PYTHONPATH=str(fake_dists)))


@pytest.fixture(scope="module")
def without_fakes(fake_dists) -> dict:
    """The same, with third-party plugins switched off by an empty FACECORE_LOAD_PLUGINS."""
    return _listing(sys.executable, subprocess_env(PYTHONPATH=str(fake_dists), FACECORE_LOAD_PLUGINS=""))


def _broken_of(listing: dict, dist: str) -> list[dict]:
    return [b for b in listing["broken"] if b["distribution"] == dist]


def _resnet_config(tmp_path: Path) -> Path:
    path = tmp_path / "resnet.yaml"
    path.write_text(f"model: {{backbone: resnet50, embedding_size: 64}}\ndata: {{root: {tmp_path}}}\n")
    return path


def test_plugin_for_a_newer_facecore_is_reported_with_the_unknown_hook(with_fakes):
    broken = _broken_of(with_fakes, "fc-future")
    assert broken, with_fakes["broken"]
    assert broken[0]["version"] == "1.2.3"
    assert "register_losses" in broken[0]["error"]


def test_plugin_raising_at_import_is_reported_with_the_reason(with_fakes):
    broken = _broken_of(with_fakes, "fc-exploding")
    assert broken, with_fakes["broken"]
    assert "boom: libfoo.so not found" in broken[0]["error"]


def test_duplicate_name_is_reported_naming_both_distributions(with_fakes):
    clashes = [b for b in with_fakes["broken"] if "resnet50" in b["error"]]
    assert clashes, with_fakes["broken"]
    text = " ".join(f"{b['distribution']} {b['error']}" for b in clashes)
    assert "fc-dup" in text and "facecore" in text.replace("fc-dup", "")


def test_broken_plugins_leave_the_bundled_components_listed(with_fakes, without_fakes):
    def bundled(listing):
        return {(c["group"], c["name"]) for c in listing["components"] if c["distribution"] == "facecore"}

    baseline = bundled(without_fakes)
    assert ("backbones", "resnet50") in baseline
    # everything facecore ships is still there, except the name the impostor took over
    assert baseline - {("backbones", "resnet50")} <= bundled(with_fakes)


def test_empty_load_plugins_hides_third_party_plugins_entirely(with_fakes, without_fakes):
    assert all(dist in json.dumps(with_fakes) for dist in FAKE_PLUGINS)  # they were seen at all
    listed = json.dumps(without_fakes)
    for dist in FAKE_PLUGINS:
        assert dist not in listed
    resnet = [c for c in without_fakes["components"] if c["name"] == "resnet50"]
    assert [c["distribution"] for c in resnet] == ["facecore"]


def test_list_plugins_table_shows_broken_plugins_and_exits_0(fake_dists):
    out = _cli(sys.executable, "list-plugins", env=subprocess_env(PYTHONPATH=str(fake_dists)))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert "resnet50" in out.stdout
    assert "fc-exploding" in out.stdout and "boom: libfoo.so not found" in out.stdout


def test_validate_with_a_duplicated_name_names_both_providers(fake_dists, tmp_path):
    config = _resnet_config(tmp_path)
    out = _cli(sys.executable, "validate", "--config", str(config), env=subprocess_env(PYTHONPATH=str(fake_dists)))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "model.backbone" in out.stderr
    assert "fc-dup" in out.stderr and "facecore" in out.stderr.replace("fc-dup", "")


# ---------------------------------------------------------------------------------------------
# The example package, pip-installed into a throwaway virtualenv
# ---------------------------------------------------------------------------------------------


def _make_venv(where: Path) -> Path:
    """A new venv that also sees this interpreter's installed packages; returns its python.

    ``--system-site-packages`` would expose the *base* interpreter's packages, not those of
    the venv running the tests (torch, facecore, ...). Instead a ``.pth`` file in the new
    venv calls ``site.addsitedir`` on each of our site-packages folders: unlike a plain path
    line, addsitedir also runs the ``.pth`` files found there, which is what makes editable
    installs (setuptools' import-hook finders) and their entry points visible. The new
    venv's own site-packages comes first on sys.path, so what pip installs there wins, and
    pip itself (run as ``python -m pip``) installs into the new venv, not ours.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    bindir = "Scripts" if os.name == "nt" else "bin"
    python = where / bindir / ("python.exe" if os.name == "nt" else "python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=subprocess_env(),
    ).stdout.strip()
    ours = [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]} if os.path.isdir(p)]
    lines = [f"import site; site.addsitedir({p!r})" for p in sorted(ours)]
    Path(purelib, "_facecore_test_outer_site.pth").write_text("\n".join(lines) + "\n")
    return python


def _write_faces(root: Path, identities: int = 3, per_identity: int = 3) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(identities):
        folder = root / f"person_{i}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, size=(112, 112, 3))
        for j in range(per_identity):
            noise = rng.integers(-20, 21, size=base.shape)
            pixels = np.clip(base + noise, 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{j}.jpg", quality=90)


@pytest.mark.slow
def test_pip_installed_backbone_is_listed_validated_trained_and_uninstalled(tmp_path):
    try:
        metadata.distribution("facecore")
    except metadata.PackageNotFoundError:
        pytest.skip("facecore is not installed (pip install -e .): its entry points are needed")
    try:
        metadata.distribution("facecore-example-mobilefacenet")
        pytest.skip("facecore-example-mobilefacenet is installed in this environment; the test must see it come and go")
    except metadata.PackageNotFoundError:
        pass
    for needed in ("pip", "setuptools"):  # --no-build-isolation builds with what is installed
        if importlib.util.find_spec(needed) is None:  # (importing setuptools here can upset distutils)
            pytest.skip(f"{needed} is not installed here; pip install {needed} to run this test")

    python = _make_venv(tmp_path / "venv")
    env = subprocess_env()
    check = subprocess.run([str(python), "-c", "import setuptools, facecore, facecore_plugins"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, f"the throwaway venv does not see our packages:\n{check.stderr}"

    source = tmp_path / "facecore-example-mobilefacenet"  # build a copy: no build/ or egg-info in the tree
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    with pytest.raises(metadata.PackageNotFoundError):  # it went into the throwaway venv only
        metadata.distribution("facecore-example-mobilefacenet")

    listing = _listing(python, env)
    rows = [c for c in listing["components"] if c["name"] == "example-mobilefacenet"]
    assert len(rows) == 1, listing
    assert rows[0]["group"] == "backbones"
    assert (rows[0]["distribution"], rows[0]["version"]) == ("facecore-example-mobilefacenet", "0.1.0")
    assert {"width_mult", "dropout"} <= set(rows[0]["options"])
    assert not [b for b in listing["broken"] if b["distribution"] == "facecore-example-mobilefacenet"]
    bundled = [c["distribution"] for c in listing["components"] if c["name"] == "mobilefacenet"]
    assert bundled == ["facecore"]  # the bundled mobilefacenet and the example install side by side

    faces, rec = tmp_path / "faces", tmp_path / "rec"
    _write_faces(faces)
    packed = _cli(python, "pack", "rec", str(faces), str(rec), env=env)
    assert packed.returncode == 0, packed.stdout + packed.stderr

    config = tmp_path / "example-mobilefacenet.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            seed: 0
            device: cpu
            model: {{backbone: example-mobilefacenet, embedding_size: 32, width_mult: 0.25, dropout: 0.1}}
            head: {{type: arcface}}
            data: {{type: recordio, root: {rec}, batch_size: 4, num_workers: 0, img_size: 112}}
            training: {{epochs: 1, lr: 0.01, warmup_epochs: 0}}
            checkpoint: {{save_dir: {tmp_path / "ckpt"}}}
            logging: {{log_dir: {tmp_path / "logs"}, tensorboard: false}}
            eval: {{bin_file: null}}
            """
        )
    )
    ok = _cli(python, "validate", "--config", str(config), env=env)
    assert ok.returncode == 0, ok.stderr
    bad = _cli(python, "validate", "--config", str(config), "--set", "model.width_mult=-1",
               "--set", "model.widht_mult=1", env=env)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    problems = [line for line in bad.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 2, bad.stderr  # both reported at once, nothing else
    assert any("model.width_mult" in line for line in problems)
    typo = [line.split("model.widht_mult", 1)[1] for line in problems if "model.widht_mult" in line]
    assert typo and "width_mult" in typo[0], problems  # the hint knows the plugin's options

    trained = _cli(python, "train", "--config", str(config), "--set", "training.max_steps=2", env=env, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    checkpoints = sorted((tmp_path / "ckpt").rglob("*.pth"))
    assert checkpoints, f"no checkpoint written:\n{trained.stdout}\n{trained.stderr}"
    from facecore.core.checkpoint import load_checkpoint

    state = load_checkpoint(max(checkpoints, key=lambda p: p.stat().st_mtime))
    assert state["config"]["model"]["backbone"] == "example-mobilefacenet"
    assert state["step"] == 2

    removed = subprocess.run([*pip, "uninstall", "-y", "facecore-example-mobilefacenet"], capture_output=True, text=True, env=env)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    after = _listing(python, env)
    assert "example-mobilefacenet" not in {c["name"] for c in after["components"]}
    assert "mobilefacenet" in {c["name"] for c in after["components"]}  # the bundled one stays
    assert not [b for b in after["broken"] if b["distribution"] == "facecore-example-mobilefacenet"]


@pytest.mark.slow
def test_example_package_tests_pass():
    """The example's own suite (not under tests/, so run here) stays green."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=subprocess_env(PYTHONDONTWRITEBYTECODE="1"), cwd=EXAMPLE, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
