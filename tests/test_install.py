"""``pip install .`` works outside the repository: the packages need nothing from the source tree.

A copy of the source tree is installed into a fresh venv (``python -m venv --without-pip``) that sees this
environment's site-packages through a ``.pth`` file, so torch and the other dependencies are not downloaded
again, and this environment's pip and setuptools build the wheel. Then, from a folder outside the repository,
each entry point answers ``--help`` from the installed copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_works_outside_the_repository(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    purelib = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(purelib.decode().strip()) / "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*argv: str) -> str:
        result = subprocess.run([py, *argv], cwd=away, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{argv}: {result.stderr[-3000:]}"
        return result.stdout

    # From a copy: setuptools writes build/ and *.egg-info beside the sources, and must not reuse stale ones.
    ignore = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs", "data", "outputs")
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=ignore)
    run("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src))
    where = run("-c", "import bolid, crawler, datapipe, demo; print(bolid.__file__, crawler.__file__, demo.__file__)")
    assert str(ROOT) not in where and str(src) not in where and where.count(str(venv)) == 3, where
    assert "COMMAND" in run("-m", "bolid", "--help")
    assert "build" in run("-m", "datapipe", "--help")
    assert "--base-url" in run("-m", "crawler", "--help")
    assert "--quick" in run("-m", "demo", "--help")
    # The crawler's defaults come from the package itself, not from a configs/ folder next to it.
    code = "from crawler.__main__ import build_parser, config_from_args as c; print(c(build_parser().parse_args([])))"
    assert "www.theplace.ru" in run("-c", code)
