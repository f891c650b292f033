"""Run the dsm command as a user would: a real process, its exit code, stdout and stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dsm_command() -> list[str]:
    """The installed `dsm` script beside this interpreter, else `python -m dsm`."""
    script = Path(sys.executable).parent / "dsm"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "dsm"]


def dsm_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DSM_ETCD", None)
    env.pop("DSM_NAMESPACE", None)
    env.pop("PYTEST_CURRENT_TEST", None)  # a long test id would make the environment too big to exec
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def dsm(*args: str, timeout: float = 120, input: str | None = None, cwd: Path | None = None,
        **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*dsm_command(), *args], capture_output=True, text=True, timeout=timeout,
                          input=input, cwd=cwd or ROOT, env=dsm_env(**env))


def spawn(*args: str, cwd: Path | None = None, stderr: Path | None = None, **env: str) -> subprocess.Popen:
    """`stderr`: a file the process writes its stderr to, for a process that may write more than a
    pipe holds (64 KiB on Linux) before the test reads it: one writing to a full pipe that nobody
    reads blocks in its next log line, event loop and all."""
    if stderr is None:
        return subprocess.Popen([*dsm_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=cwd or ROOT, env=dsm_env(**env), start_new_session=True)
    with stderr.open("w", encoding="utf-8") as err:
        return subprocess.Popen([*dsm_command(), *args], stdout=subprocess.PIPE, stderr=err, text=True,
                                cwd=cwd or ROOT, env=dsm_env(**env), start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 60) -> str:
    """SIGTERM a spawned process that writes little, wait for it, and return the rest of its stderr:
    what `readline` buffered beyond the lines it returned included, which `communicate` would miss."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.stderr.read() if proc.stderr else ""


def waits_for_signals(path: Path) -> bool:
    """Whether a machine (or one it calls) waits for signals: an embedded run cannot finish it."""
    from dsm import compiler

    graph = compiler.load(path, import_handlers=False)
    return any(st.signal for g in (graph, *graph.children().values()) for st in g.states.values())


def line_with(proc: subprocess.Popen, text: str) -> str:
    """Read a process's stderr up to the first line holding `text` (or its end: then "")."""
    for line in proc.stderr:  # type: ignore[union-attr]
        if text in line:
            return line
    return ""
