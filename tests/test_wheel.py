"""The installed package works outside a checkout (issue 26 §1): build the wheel, install it into a fresh
virtual environment (dependencies from this one: ``--system-site-packages``, nothing downloaded), and run
commands from a folder that is not the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)  # fmt: skip
    wheel = next(dist.glob("ctxaware-*.whl"))
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], check=True)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    return env


def _run(venv: Path, cwd: Path, *args: str, **env) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CTXAWARE_DATA", "CTXAWARE_SHARED_DATA", "PYTHONPATH")
    }
    return subprocess.run([str(venv / "bin" / "ctxaware"), *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_installed_wheel_runs_outside_the_checkout(venv, tmp_path):
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import ctxaware; print(ctxaware.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert str(venv) in where and str(REPO) not in where  # the wheel's copy, not the checkout
    recipes = _run(venv, tmp_path, "recipes")
    assert recipes.returncode == 0 and "cpu_smoke" in recipes.stdout, recipes.stderr
    assert _run(venv, tmp_path, "train", "cpu_smoke", "--help").returncode == 0
    # the data folder: one setting (CTXAWARE_DATA); without it, outside a checkout, one line that says where
    args = ["nih", "--lengths", "300", "--depths", "50", "--template", "1", "--dump-prompts", "p.jsonl"]
    missing = _run(venv, tmp_path, *args)
    assert missing.returncode == 2 and "CTXAWARE_DATA" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.jsonl").exists()
    ok = _run(venv, tmp_path, *args, CTXAWARE_DATA=str(SHARED_DATA))
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = (tmp_path / "p.jsonl").read_text().splitlines()
    assert rows and all('"length": 300' in r for r in rows)
