"""-v / -q / --log-format: how much goes to stderr, and in which form (text, or JSON lines)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from dsm import logs

from .exits import ExitCode, Fail
from .output import err, info


@dataclass(slots=True)
class Verbosity:
    """-v / -q / --log-format as given so far: before the command, after it, or both."""

    verbose: bool = False
    quiet: bool = False
    log_format: str = "text"


given = Verbosity()


def set_verbosity(verbose: bool, quiet: bool, log_format: str | None = None) -> None:
    """Apply -v / -q / --log-format wherever they were given (`dsm -v run x.yaml` or `dsm run x.yaml -v`;
    a --log-format after the command wins over one before it, or DSM_LOG_FORMAT)."""
    given.verbose |= verbose
    given.quiet |= quiet
    if log_format is not None:
        if log_format not in logs.FORMATS:
            raise Fail(ExitCode.INVALID, f"--log-format must be 'text' or 'json', not {log_format!r}")
        given.log_format = log_format
    verbose, quiet = given.verbose, given.quiet
    if verbose and quiet:
        raise Fail(ExitCode.INVALID, "-v (--verbose) and -q (--quiet) contradict each other: give one of them")
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    info.quiet = quiet
    logs.current.format = "json" if given.log_format == "json" else "text"
    err.json_lines = info.json_lines = logs.current.format == "json"
    handler: logging.Handler
    if err.is_terminal:
        from rich.logging import RichHandler

        handler = RichHandler(console=err, show_path=False, show_time=verbose, markup=False,
                              rich_tracebacks=verbose)
        handler.setFormatter(logs.TextFormatter("%(context)s%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logs.formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    logging.getLogger("dsm.handler").setLevel(logging.NOTSET if verbose else logging.ERROR if quiet else logging.INFO)


def hush(logger: str) -> None:
    """Keep a logger's records below ERROR off stderr, unless -v asked for everything."""
    if not given.verbose:
        logging.getLogger(logger).setLevel(logging.ERROR)
