"""The `dsm` command: a thin shell that parses, calls the dsm package, and formats.

Data goes to stdout, logs and progress to stderr. Exit codes are the contract's (`ExitCode`).
stderr carries two kinds of text: progress and notes (`info`), which -q silences, and errors and
log records (`err`). With -q, stderr stays empty unless the command fails.

Laid out as pip's command line is: the application and the options commands share (`app`,
`options`, `etcd`: the etcd connection options as one `EtcdArgs`), what commands read and write
(`inputs`, `output`, `progress`, `verbosity`), exit codes (`exits`), and `commands/`, one module
a group of commands. A command parses, calls one function of the package, and formats; the
wiring of a running worker is the package's (`dsm.service`).
"""

from __future__ import annotations

from .app import app
from .etcd import EtcdArgs
from .exits import ExitCode, Fail
from .main import main

__all__ = ["EtcdArgs", "ExitCode", "Fail", "app", "main"]
