"""`dsm submit`: instances started on etcd, their ids printed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .. import inputs
from ..app import command
from ..etcd import EtcdArgs
from ..exits import ExitCode, Fail
from ..options import Definition, GivenId, NoImportOpt, PayloadFileOpt, PayloadOpt
from ..output import counting, emit

if TYPE_CHECKING:
    from dsm.client import AsyncClient


@command(etcd=True)
def submit(path: Definition, payload: PayloadOpt = None, payload_file: PayloadFileOpt = None,
           jsonl: Annotated[Path | None, typer.Option("--jsonl", metavar="FILE", help=(
               "One instance per line of FILE ('-': stdin); a line's top-level 'id' is its instance id."))] = None,
           no_import: NoImportOpt = False, instance_id: GivenId = None, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Start instances on etcd; print each instance id on its own line.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    if jsonl is not None and (payload is not None or payload_file is not None):
        raise Fail(ExitCode.INVALID, "give --jsonl or --payload/--payload-file, not both")
    if jsonl is not None and instance_id is not None:
        raise Fail(ExitCode.INVALID, "--id names one instance: with --jsonl, give each line an 'id' field")
    etcd.options()
    graph_ = inputs.load(path, no_import=no_import)
    starts = list(inputs.jsonl(jsonl)) if jsonl is not None else [
        (inputs.given_id(instance_id) if instance_id is not None else None, inputs.payload(payload, payload_file))]
    bodies = [body for _, body in starts]
    ids = [given for given, _ in starts] if any(given is not None for given, _ in starts) else None

    async def submit_all(client: AsyncClient) -> None:
        from dsm.operations import SUBMIT_BATCH

        step = 16 * SUBMIT_BATCH  # ids are printed, and progress shown, as each slice is stored
        with counting("submitting", len(bodies) if len(bodies) > 1 else 0) as advance:
            for start in range(0, len(bodies), step):
                for iid in await client.start_many(graph_, bodies[start:start + step],
                                                   ids[start:start + step] if ids else None):
                    emit(iid + "\n")
                advance(min(step, len(bodies) - start))

    etcd.call(submit_all)
