"""`dsm validate`, `dsm graph`, `dsm schema`: definitions checked, drawn, and their schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsm import compiler, render, schema
from dsm.errors import DefinitionError

from ..app import command
from ..exits import ExitCode, Fail
from ..inputs import definition_files, load, print_problems
from ..options import Definition, NoImportOpt
from ..output import emit, err, info


@command()
def validate(paths: Annotated[list[Path], typer.Argument(metavar="PATH", show_default=False,
                                                         help="Definition files, or folders of *.yaml / *.yml.")],
             no_import: NoImportOpt = False) -> None:
    """Check definitions; print one line per problem: PATH:LINE:COL: error: MESSAGE.

    Limits: DSM_MAX_DEFINITION_BYTES (default 1048576) and DSM_MAX_STATES (default 2000).

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    files = definition_files(paths)
    bad = 0
    for path in files:
        try:
            graph = compiler.load(path, import_handlers=not no_import)
        except DefinitionError as exc:
            bad += 1
            print_problems(exc)
            continue
        info.print(f"{path}: ok (machine {graph.machine}, {len(graph.states)} states)", markup=False)
    if bad:
        err.print(f"{bad} of {len(files)} file(s) invalid", markup=False)
        raise Fail(ExitCode.INVALID)


@command()
def graph(path: Definition,
          format: Annotated[str, typer.Option("--format", "-f", metavar="|".join(render.RENDERERS),
                                              help="Diagram language.")] = "mermaid",
          output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE",
                                                      help="Write to FILE instead of stdout.")] = None,
          no_import: NoImportOpt = False) -> None:
    """Draw a machine as a Mermaid state diagram or a Graphviz graph.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    renderer = render.RENDERERS.get(format)
    if renderer is None:
        raise Fail(ExitCode.INVALID, f"--format must be one of {', '.join(render.RENDERERS)}, got {format!r}")
    text = renderer(load(path, no_import=no_import))
    if output is None:
        emit(text)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise Fail(ExitCode.INVALID, f"cannot write {output}: {exc.strerror or exc}") from None
        info.print(f"wrote {output}", markup=False)


@command("schema")
def schema_command() -> None:
    """Print the JSON Schema of machine definitions."""
    emit(schema.schema_text().rstrip("\n") + "\n")
