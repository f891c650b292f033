"""The distribution: a name of its own on the package index, the `dsm` package alone at the top
level of the wheel, the command's entry point inside it, `python -m dsm`, shell completion."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from clitools import ROOT, dsm, dsm_env


def test_the_wheel_installs_the_dsm_package_alone_under_a_name_of_its_own(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith("dsm_workflow-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names}
        (info,) = {top for top in tops if top.endswith(".dist-info")}
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert tops == {"dsm", info}, tops
    assert "dsm = dsm.cli:main" in entry_points
    assert "Name: dsm-workflow" in metadata
    assert "dsm/machine.schema.json" in names and "dsm/api/static/index.html" in names


def test_python_dash_m_dsm_is_the_command():
    result = subprocess.run([sys.executable, "-m", "dsm", "validate", "definitions/order.yaml"], capture_output=True,
                            text=True, cwd=ROOT, env=dsm_env(), timeout=60)
    assert result.returncode == 0 and "machine order" in result.stdout + result.stderr, result.stderr
    version = subprocess.run([sys.executable, "-m", "dsm", "--version"], capture_output=True, text=True, cwd=ROOT,
                             env=dsm_env(), timeout=60)
    assert version.stdout.startswith("dsm ") and version.returncode == 0


def test_shell_completion_as_typer_gives_it():
    """`--install-completion` is offered; the script it installs is what the shell gets by asking
    as the script itself asks (`_DSM_COMPLETE`): `--show-completion` alone guesses the shell from
    the processes above it, which a test run does not fix."""
    assert "--install-completion" in dsm("--help").stdout
    shown = dsm(_DSM_COMPLETE="source_bash")
    assert shown.returncode == 0 and "_dsm_completion" in shown.stdout and "complete " in shown.stdout


def test_the_install_lines_name_the_distribution():
    """An install from the package index names our distribution, never the unrelated `dsm`."""
    for path in [ROOT / "README.md", ROOT / "Dockerfile", *(ROOT / "docs").glob("*.md"), *(ROOT / "dsm").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for wrong in ("pip install dsm ", "pip install 'dsm[", 'pip install "dsm['):
            assert wrong not in text, path
