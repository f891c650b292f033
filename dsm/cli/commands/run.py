"""`dsm run`: one instance started and waited for, embedded or on etcd (with local workers or not)."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any

import typer

from dsm import logs, records
from dsm.graph import Graph
from dsm.transition import descends_from

from .. import inputs
from ..app import command
from ..etcd import EtcdArgs
from ..exits import ExitCode, Fail, exit_for
from ..loop import run_async
from ..options import Definition, GivenId, PayloadFileOpt, PayloadOpt
from ..output import err, print_json
from ..progress import Progress
from ..verbosity import hush


@command(etcd=True)
def run(path: Definition, payload: PayloadOpt = None, payload_file: PayloadFileOpt = None,
        workers: Annotated[int, typer.Option("--workers", min=0, metavar="N",
                                             help="Ticks run at once (local workers with --etcd).")] = 4,
        timeout: Annotated[str | None, typer.Option("--timeout", metavar="DURATION",
                                                    help="Give up waiting after DURATION (exit 4).")] = None,
        as_json: Annotated[bool, typer.Option("--json", metavar="",
                                              help="Print the instance record on stdout.")] = False,
        no_import: Annotated[bool, typer.Option("--no-import", metavar="", help="Do not import handlers "
                                                "(only with --etcd and --workers 0).")] = False,
        instance_id: GivenId = None,
        etcd: EtcdArgs = EtcdArgs()) -> None:
    """Start one instance and wait for it: embedded, or on etcd with --etcd.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    body = inputs.payload(payload, payload_file)
    limit = inputs.duration(timeout, "--timeout")
    if not etcd.given and workers == 0:
        raise Fail(ExitCode.INVALID, "--workers 0 needs --etcd: embedded runs have no workers elsewhere")
    if no_import and (not etcd.given or workers > 0):
        raise Fail(ExitCode.INVALID, "--no-import needs --etcd URLS --workers 0: embedded runs and local "
                                     "workers run the handlers, so they must import them")
    if instance_id is not None:
        inputs.given_id(instance_id)
    graph_ = inputs.load(path, no_import=no_import)
    progress = Progress(graph_.machine)
    started: list[str] = []  # the instance, once it is in the store
    try:
        if etcd.given:
            etcd.options()
            result = run_async(lambda: _run_etcd(graph_, body, etcd, workers, limit, progress, instance_id,
                                                 started))
        else:
            result = run_async(lambda: _run_embedded(graph_, body, workers, limit, progress, instance_id))
    except Fail as exc:
        if exc.code == ExitCode.INTERRUPTED and started:
            raise Fail(ExitCode.INTERRUPTED, _goes_on(started[0], etcd.namespace)) from None
        raise
    finally:
        progress.stop()
    record, timed_out = result
    if as_json:
        print_json(record)
    if timed_out:
        active, iid = ", ".join(record["active"]) or "-", record["id"]
        if etcd.given:
            raise Fail(ExitCode.TIMEOUT, f"--timeout {timeout} passed; instance {iid} is still running in "
                                         f"namespace {etcd.namespace!r} (active: {active}): 'dsm status {iid}' "
                                         "shows how it goes on")
        raise Fail(ExitCode.TIMEOUT, f"--timeout {timeout} passed; instance {iid} was stopped unfinished "
                                     f"(active: {active}) when this process ended: embedded instances live only "
                                     "as long as 'dsm run' (with --etcd they outlive it)")
    progress.finished(record)
    raise typer.Exit(exit_for(record))


async def _run_embedded(graph_: Graph, body: dict, workers: int, limit: float | None,
                        progress: Progress, instance_id: str | None = None) -> tuple[dict[str, Any], bool]:
    """(the record, whether --timeout passed first) of one instance run in this process."""
    from dsm import embedded

    logs.current.worker = embedded.Engine.worker_id  # the name the history gives to the worker of an embedded run
    if limit is not None:
        # Once --timeout passes, the instance ends with the process. What the embedded worker logs
        # as it stops (ticks still running, claims released) is then nothing for the user to act on.
        asyncio.get_running_loop().call_later(limit, hush, "dsm.worker")
    hinted: set[str] = set()

    def update(inst: records.Instance) -> None:  # of the instance and of its children
        if inst.parent is None:
            progress.update(inst.transitions, inst.active)
        if not any(t.waits is not None and t.waits.startswith("signal:") for t in inst.tokens.values()):
            return  # (called on every transition: what it waits for is worked out only when it may be a signal)
        for wait in records.waiting(inst):
            if wait["kind"] == "signal" and wait["signal"] not in hinted:  # nobody can send it here
                hinted.add(wait["signal"])
                err.print(f"instance {inst.id} waits for signal {wait['signal']!r} at state {wait['state']!r}; an "
                          "embedded run takes no signals: run it on etcd ('dsm run --etcd ...', then 'dsm signal'), "
                          "or test it with 'dsm test' and signals in the test file", markup=False,
                          fields=logs.about(inst.id, inst.machine, wait["state"]))

    try:
        result = await embedded.run_graph(graph_, body, workers=workers, timeout=limit,
                                          on_history=None if progress.silent else progress.committed,
                                          on_update=update,
                                          on_start=lambda iid: progress.note(iid, f"instance {iid} started"),
                                          instance_id=instance_id)
        return result.record, False
    except asyncio.TimeoutError as exc:
        return exc.args[0].record, True


async def _run_etcd(graph_: Graph, body: dict, etcd: EtcdArgs, workers: int, limit: float | None,
                    progress: Progress, given_id: str | None = None,
                    started: list[str] | None = None) -> tuple[dict[str, Any], bool]:
    """(the record, whether --timeout passed first) of one instance started on etcd and waited for,
    run by `workers` local workers (0: by workers elsewhere)."""
    from dsm.client import AsyncClient
    from dsm.errors import Timeout
    from dsm.service import serving

    options = etcd.options()
    async with etcd.open() as store:
        client = AsyncClient.over(store, options.keys)
        instance_id, created = await client.operations.start(graph_, body, instance_id=given_id)
        if started is not None:
            started.append(instance_id)
        if created:
            progress.note(instance_id, f"instance {instance_id} submitted to namespace {options.namespace!r}")
        else:
            progress.note(instance_id, f"instance {instance_id} exists in namespace {options.namespace!r} with this "
                          "definition and payload: waiting for it")

        async def wait() -> tuple[dict[str, Any], bool]:
            try:
                return await client.wait(instance_id, timeout=limit, on_history=progress.history,
                                         on_update=lambda now: progress.update(now["transitions"], now["active"])), \
                    False
            except Timeout:
                return await client.get(instance_id), True

        if workers <= 0 or (not created and (await client.operations.instance(instance_id)).finished):
            return await wait()  # (an instance that exists and has finished needs no workers)
        from dsm.worker import default_worker_id

        logs.current.worker = default_worker_id()  # the local workers' name
        # local workers run this instance (and its children) only, never other work of a shared namespace;
        # starting it stored the definition
        mine = functools.partial(descends_from, root=instance_id)
        async with serving(store, options.keys, [graph_], concurrency=workers, store_definitions=False, grace=5,
                           serves=mine):
            return await wait()


def _goes_on(instance_id: str, namespace: str) -> str:
    """What Ctrl-C on `dsm run --etcd` leaves behind, and what to do about it."""
    return (f"interrupted; instance {instance_id} goes on in namespace {namespace!r} with the workers that serve "
            f"its definition: follow it with 'dsm status {instance_id} --follow', cancel it with "
            f"'dsm cancel {instance_id}'")
