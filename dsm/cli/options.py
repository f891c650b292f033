"""Options and arguments that several commands take, declared once as types.

Flags get an empty metavar: recent typer shows `<bool>` otherwise. The options every command
takes (-v, -q, --log-format) are `OUTPUT_PARAMETERS`, added by `app.command`; the etcd connection
options are `etcd.ETCD_PARAMETERS`, collected into one `EtcdArgs`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

Verbose = Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Log details and tracebacks to stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="Only errors on stderr (none on success).")]
LOG_FORMAT_HELP = ("Log lines on stderr as 'text' or 'json' (one object per line, with instance, machine, state, "
                   "attempt and worker on lines about an instance).")
LogFormatOpt = Annotated[str | None, typer.Option("--log-format", metavar="text|json", show_default="text",
                                                  help=LOG_FORMAT_HELP)]
Definition = Annotated[Path, typer.Argument(metavar="PATH", help="Definition file.", show_default=False)]
PayloadOpt = Annotated[str | None, typer.Option("--payload", metavar="JSON", help="Initial payload, a JSON object.")]
PayloadFileOpt = Annotated[Path | None, typer.Option("--payload-file", metavar="FILE",
                                                     help="Read the payload from FILE ('-': stdin).")]
NoImportOpt = Annotated[bool, typer.Option("--no-import", metavar="", help="Do not import handler modules.")]
InstanceId = Annotated[str, typer.Argument(metavar="ID", help="Instance id.", show_default=False)]
GivenId = Annotated[str | None, typer.Option(
    "--id", metavar="ID", help="The instance's id (default: generated). Starting an id that exists with the same "
                               "definition and payload returns that instance; with others is refused (exit 2).")]


def keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A keyword parameter added to a command's signature (typer reads options from it)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


OUTPUT_PARAMETERS = [keyword("verbose", Verbose, False), keyword("quiet", Quiet, False),
                     keyword("log_format", LogFormatOpt, None)]
