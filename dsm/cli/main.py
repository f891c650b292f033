"""`main`: the `dsm` command's entry point. Turns what a command raises into one line on stderr and
the contract's exit code."""

from __future__ import annotations

import logging
import os
import sys

from dsm.errors import DsmError, NoSpace, PartFailed, StoreUnavailable

from . import commands  # noqa: F401  (registers the commands on app)
from .app import app
from .exits import ExitCode, Fail, part_failed_code
from .output import drop, err

log = logging.getLogger("dsm.cli")


def main() -> None:
    """Entry point of the `dsm` command.

    Ends with os._exit once output is flushed: a tick abandoned after --timeout or an interrupt may
    still be running in a handler thread, and the process must not wait for user code to return.
    """
    code = int(ExitCode.OK)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's C core logs each failed TLS handshake at INFO
    try:
        app(prog_name="dsm")  # standalone: usage errors exit 2, typer.Exit carries our codes
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else int(ExitCode.INVALID))
    except Fail as exc:
        if str(exc):
            err.print(f"dsm: {exc}", markup=False)
        code = int(exc.code)
    except KeyboardInterrupt:
        err.print("dsm: interrupted", markup=False)
        code = int(ExitCode.INTERRUPTED)
    except PartFailed as exc:  # a worker or server that cannot go on: a supervisor restarts it
        err.print(f"dsm: {exc}", markup=False)
        code = int(part_failed_code(exc))
    except NoSpace as exc:
        err.print(f"dsm: etcd refuses writes, its NOSPACE alarm is raised ({exc}); an operator must make room and "
                  "disarm it (docs/operations.md)", markup=False)
        code = int(ExitCode.UNREACHABLE)
    except StoreUnavailable as exc:
        err.print(f"dsm: etcd unreachable: {exc}", markup=False)
        code = int(ExitCode.UNREACHABLE)
    except DsmError as exc:
        err.print(f"dsm: {exc}", markup=False)
        code = int(ExitCode.INVALID)
    except BrokenPipeError:  # a closed pipe met outside emit and our consoles: end as if dropped
        code = int(ExitCode.OK)
    except Exception as exc:  # the unexpected: one line, the traceback with -v
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("unexpected error")
        err.print(f"dsm: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
                  markup=False)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            drop(stream)
            stream.flush()
    os._exit(code)
