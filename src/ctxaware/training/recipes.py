"""The training recipes shipped with ctxaware, addressed by name (``ctxaware train cpu_smoke``) or by path.

``ctxaware recipes`` lists them with their first comment line. The YAML files live in ``ctxaware/recipes/``
(package data, so an installed wheel has them); their data paths are ``shared:REL`` (inside the shared
data folder, `config.default_data_dir`), so a recipe runs from any directory.
"""

from __future__ import annotations

from pathlib import Path

from ctxaware.core.errors import CtxawareError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def names() -> list[str]:
    """Every recipe's name (its file name without ``.yaml``), sorted."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve(spec: str) -> str:
    """A recipe name or a YAML path -> the YAML path. An unknown name is one line listing the names."""
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        return spec
    path = RECIPES / f"{spec}.yaml"
    if not path.is_file():
        raise CtxawareError(f"no recipe named {spec!r}; recipes: {', '.join(names())} (or give a YAML path)")
    return str(path)


def summary(name: str) -> str:
    """The recipe's first comment line."""
    for line in (RECIPES / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
