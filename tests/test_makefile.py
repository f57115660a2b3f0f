"""The README's two commands run under Debian's /bin/sh (dash): every recipe of `make test` and `make demo` is run
under dash with stub tools (a fake venv whose python / efdit only log their arguments), in a copy of the Makefile."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASH = shutil.which("dash") or ("/bin/dash" if Path("/bin/dash").exists() else None)
pytestmark = pytest.mark.skipif(DASH is None or shutil.which("make") is None,
                                reason="needs make and dash (Debian package dash)")

STUB = '#!/bin/sh\necho "{name} $*" >> "$(dirname "$0")/../../calls.log"\n'


def make_sandbox(tmp_path: Path) -> Path:
    for f in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "v" / "bin").mkdir(parents=True)
    for name in ("python", "efdit"):
        stub = tmp_path / "v" / "bin" / name
        stub.write_text(STUB.format(name=name))
        stub.chmod(0o755)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "install_data.sh").write_text('echo "install_data $*" >> calls.log\n')
    return tmp_path


@pytest.mark.parametrize("shell", sorted({DASH, "/bin/sh"}))
@pytest.mark.parametrize("target", ["test", "demo"])
def test_readme_targets_run_under_posix_sh(tmp_path, shell, target):
    box = make_sandbox(tmp_path)
    # `browser` installs Chromium with apt: not part of what this checks (its recipe is run by `make -n` below)
    r = subprocess.run(["make", f"SHELL={shell}", "VENV=v", "-o", "browser", target], cwd=box,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Illegal option" not in r.stderr and "not found" not in r.stderr, r.stderr
    calls = (box / "calls.log").read_text()
    assert "python -m pip install -q -c constraints.txt -e ." in calls   # the set-up recipe ran
    assert ("python -m pytest -q" in calls and "python -m ruff check" in calls) if target == "test" else \
        ("efdit demo" in calls)


def test_every_recipe_line_parses_under_dash(tmp_path):
    """`make -n` prints each recipe of every target; dash must accept each as shell syntax."""
    box = make_sandbox(tmp_path)
    r = subprocess.run(["make", "-n", "-B", "VENV=v", "setup", "data", "data-all", "browser", "test", "demo"],
                       cwd=box, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    script = box / "recipes.sh"
    script.write_text(r.stdout)
    check = subprocess.run([DASH, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "pipefail" not in r.stdout and "[[" not in r.stdout and "source " not in r.stdout


def test_ci_runs_the_readme_test_command_as_written():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "SHELL=" not in ci
