"""pyproject.toml lists every package of the repository (so `pip install -e .` ships them all)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package_and_the_config_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in ROOT.glob("*/**/__init__.py")
        if init.parts[len(ROOT.parts)] not in ("tests", "bench", "outputs")
    }
    assert listed == on_disk
    assert config["tool"]["setuptools"]["package-data"]["configs"] == ["*.json"]
    assert list((ROOT / "configs").glob("*.json"))
    requirements = [line for line in (ROOT / "requirements.txt").read_text().split("\n") if line.strip()]
    assert config["project"]["dependencies"] == requirements  # one set of pins
