"""What the project ships stays true: example configs validate, the README documents every config key."""

from __future__ import annotations

from pathlib import Path

import pytest

from facecore.core.config import core_schema, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    config = load_config(path)
    assert config["model"]["backbone"] in ("resnet50", "fastcontextface")


def _core_keys(schema: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        if sub.get("type") == "object" and "properties" in sub:
            keys += _core_keys(sub, f"{path}.")
        else:
            keys.append(path)
    return keys


def test_readme_config_reference_lists_every_core_key() -> None:
    readme = (ROOT / "README.md").read_text()
    keys = _core_keys(core_schema())
    assert len(keys) > 30
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"README.md's config reference lacks {missing}"
