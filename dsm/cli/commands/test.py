"""`dsm test`: machines' test cases, run offline (`dsm.testing`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsm.errors import DefinitionError, InputError

from ..app import command
from ..exits import ExitCode, Fail
from ..inputs import print_problems
from ..output import emit


@command("test")
def test_command(paths: Annotated[list[Path], typer.Argument(
        metavar="PATH", show_default=False, help="Test files, or folders of *.test.yaml.")]) -> None:
    """Run machines' test cases offline: embedded, one tick at a time, time skipped, handlers mocked.

    Prints PASS FILE::NAME or FAIL FILE::NAME: WHAT DIFFERED per case, then N passed, M failed.

    Exit 1 when a case failed, 2 for a bad test file (its problems as FILE:LINE:COL: error: ...).

    Imports the handler modules of the machines, running their code.
    """
    from dsm import testing

    try:
        files = testing.find_test_files(paths)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    results: list[testing.FileResult] = []
    bad = 0
    for path in files:
        try:
            result = testing.run_file(path)
        except DefinitionError as exc:
            bad += 1
            print_problems(exc)
            continue
        results.append(result)
        emit(result.report())
    passed, failed = testing.summary(results)
    emit(f"{passed} passed, {failed} failed\n")
    if bad:
        raise Fail(ExitCode.INVALID, f"{bad} of {len(files)} test file(s) invalid: their cases did not run")
    if failed:
        raise typer.Exit(ExitCode.CASE_FAILED)
