"""Handler modules are imported with the definition's folder first, for those imports only.

A folder left at the front of sys.path would hide the standard library, installed packages or
another definition's modules for the rest of the process: a definition could take over dsm."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest
from clitools import dsm

from dsm import compiler, handlers
from dsm.definitions import Registry, register
from dsm.errors import DefinitionError, NotFound
from dsm.keys import Keys
from dsm.store.memory import MemoryStore

ONE = """
machine: {name}
start: a
states:
  a:
    tick: {ref}
    next: done
  done:
    terminal: true
"""

# modules dsm imports late (when it starts a worker, connects, makes ids...), and some it has already
LATE = ("calendar", "pkgutil", "socket", "uuid", "heapq", "queue", "platform", "getpass", "selectors", "concurrent",
        "json", "random", "hashlib", "signal", "threading", "logging")


def folder(tmp_path: Path, name: str, *, ref: str, **modules: str) -> Path:
    where = tmp_path / name
    where.mkdir()
    (where / "m.yaml").write_text(ONE.format(name=name, ref=ref))
    for module, source in modules.items():
        (where / f"{module}.py").write_text(textwrap.dedent(source))
    return where / "m.yaml"


def test_a_definition_folder_is_on_the_import_path_only_while_its_modules_are_imported(tmp_path):
    path = folder(tmp_path, "one", ref="mod_one:f", mod_one="def f(payload, ctx):\n    pass\n")
    before = list(sys.path)
    graph = compiler.load(path)
    assert graph.states["a"].tick.func is not None
    assert sys.path == before and str(path.parent) not in sys.path


@pytest.mark.etcd
def test_files_named_like_standard_modules_beside_a_definition_do_not_replace_them(tmp_path, etcd, namespace):
    hijack = {name: f"raise SystemExit('HIJACKED {name}')\n" for name in LATE}
    path = folder(tmp_path, "run", ref="flow:f", flow="def f(payload, ctx):\n    payload['ok'] = True\n", **hijack)
    # run --etcd loads the definition first and the etcd client (grpc: calendar, pkgutil ...) after it
    for command in (["validate", str(path)], ["graph", str(path)],
                    ["run", str(path), "--json", "--etcd", etcd.endpoint, "--namespace", namespace]):
        result = dsm(*command)
        assert result.returncode == 0 and "HIJACKED" not in result.stdout + result.stderr, (command, result.stderr)
    assert '"ok": true' in result.stdout


def test_a_handler_module_that_would_hide_a_standard_module_is_refused(tmp_path):
    path = folder(tmp_path, "std", ref="json:dumps", json="def dumps(payload, ctx):\n    pass\n")
    with pytest.raises(DefinitionError) as info:
        compiler.load(path)
    assert "json.py would hide the standard library module 'json'; rename it" in str(info.value)
    assert "std" not in (getattr(sys.modules["json"], "__file__", "") or "")


def test_a_helper_that_would_hide_a_standard_module_is_refused_and_not_kept(tmp_path):
    if "tabnanny" in sys.modules:
        pytest.skip("tabnanny is loaded already")
    path = folder(tmp_path, "helper", ref="uses_helper:f", tabnanny="X = 1\n",
                  uses_helper="import tabnanny\n\ndef f(payload, ctx):\n    return {'x': tabnanny.X}\n")
    with pytest.raises(DefinitionError) as info:
        compiler.load(path)
    assert "tabnanny.py, which would hide the standard library module 'tabnanny'" in str(info.value)
    assert "tabnanny" not in sys.modules


def test_two_definitions_with_a_module_of_the_same_name_each_get_their_own(tmp_path):
    first = folder(tmp_path, "first", ref="steps:f", steps="def f(payload, ctx):\n    return {'by': 'first'}\n")
    second = folder(tmp_path, "second", ref="steps:f", steps="def f(payload, ctx):\n    return {'by': 'second'}\n")
    a, b = compiler.load(first), compiler.load(second)
    assert a.states["a"].tick.func({}, None) == {"by": "first"}
    assert b.states["a"].tick.func({}, None) == {"by": "second"}
    result = dsm("validate", str(first), str(second))
    assert result.returncode == 0, result.stdout


def test_a_definition_from_the_store_imports_only_from_the_workers_search_path(tmp_path):
    local = folder(tmp_path, "local", ref="near:f", near="def f(payload, ctx):\n    pass\n",
                   stored_mod="def f(payload, ctx):\n    pass\n")
    compiler.load(local)  # its folder was on the import path for this, and is gone again
    stored = compiler.compile_text(ONE.format(name="stored", ref="stored_mod:f"), "stored.yaml", import_handlers=False)

    async def main(search_path):
        store = MemoryStore()
        await register(store, Keys(), stored)
        return await Registry(store, Keys(), search_path=search_path).get(stored.digest)

    with pytest.raises(NotFound, match="no module named 'stored_mod'"):
        asyncio.run(main(()))
    assert asyncio.run(main((str(local.parent),))).states["a"].tick.func is not None


def test_commands_that_import_handlers_say_so_in_their_help():
    for command in ("validate", "graph", "submit", "run"):
        text = " ".join(dsm(command, "--help").stdout.split())
        assert "running their code" in text and "--no-import" in text, command


def test_handlers_resolve_keeps_the_process_import_path():
    before = list(sys.path)
    with pytest.raises(handlers.HandlerImportError):
        handlers.resolve("nowhere_mod:f", search_path=["/nonexistent-folder"])
    assert sys.path == before
