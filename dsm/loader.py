"""Read a machine file into plain data that remembers where every node came from.

PyYAML speaks YAML 1.1, where `on`, `off`, `yes` and `no` are booleans and duplicate keys silently
overwrite each other. A workflow language cannot afford either: a state routed `on: {yes: ...}`
must keep the label "yes", and a state defined twice is a bug to report, not to hide. So the
loader composes nodes with YAML 1.2 core-schema resolvers and builds the values itself, keeping
the line and column of every key and value for error messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import limits, payloads
from .errors import DefinitionError, Problem

Key = tuple[str | int, ...]

# Aliases can expand a small file into a huge tree ("billion laughs"); no machine needs this many.
MAX_NODES = 200_000
MAX_DEPTH = 128

# A definition may come from anyone who can write to the store; these bound what one costs to
# check (and to store: etcd refuses requests over 1.5 MiB). Users with bigger machines raise them.
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_STATES = 2000


def max_definition_bytes() -> int:
    """The largest definition file dsm reads: DSM_MAX_DEFINITION_BYTES, default 1 MiB."""
    return limits.from_env("DSM_MAX_DEFINITION_BYTES", DEFAULT_MAX_BYTES)


def max_states() -> int:
    """The most states one machine may have: DSM_MAX_STATES, default 2000."""
    return limits.from_env("DSM_MAX_STATES", DEFAULT_MAX_STATES)


def _too_large(file: str, head: bytes, limit: int) -> Problem:
    """Where a definition passes the size limit: the line and column of its first byte too many."""
    inside = head[:limit]
    line = inside.count(b"\n") + 1
    col = len(inside) - (inside.rfind(b"\n") + 1) + 1
    return Problem(file, line, col, f"definition too large: more than {limit} bytes (the limit; set "
                                    "DSM_MAX_DEFINITION_BYTES to raise it)")

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)

_TAG = "tag:yaml.org,2002:"


def _core_schema_loader() -> type:
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    resolvers: dict[str | None, list] = {}

    class Yaml12Loader(base):  # type: ignore[misc, valid-type]
        """SafeLoader with the YAML 1.2 core schema instead of YAML 1.1's implicit types."""

    Yaml12Loader.yaml_implicit_resolvers = resolvers
    add = Yaml12Loader.add_implicit_resolver
    add(_TAG + "bool", _BOOL, list("tTfF"))
    add(_TAG + "null", _NULL, ["~", "n", "N", ""])
    add(_TAG + "int", _INT, list("-+0123456789"))
    add(_TAG + "float", _FLOAT, list("-+.0123456789"))
    return Yaml12Loader


_LOADER = _core_schema_loader()


@dataclass
class Document:
    """A parsed file: its data plus the position of every value and every mapping key."""

    file: str
    text: str
    data: Any
    values: dict[Key, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Key, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: Key, *, key: bool = False) -> tuple[int, int]:
        """Line and column of a node, falling back to the nearest ancestor that has one."""
        table = self.keys if key else self.values
        probe = tuple(path)
        while probe:
            if probe in table:
                return table[probe]
            if probe in self.values:
                return self.values[probe]
            probe = probe[:-1]
        return self.values.get((), (1, 1))

    def problem(self, path: Key, message: str, *, key: bool = False) -> Problem:
        line, col = self.where(path, key=key)
        return Problem(self.file, line, col, message, dotted(path))


def dotted(path: Key) -> str:
    """Render a key path the way users read it: states.bill.retry.max_attempts, choose[1]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _scalar(node: yaml.ScalarNode) -> Any:
    tag, text = node.tag, node.value
    if tag == _TAG + "str":
        return text
    if tag == _TAG + "null":
        return None
    if tag == _TAG + "bool":
        return text.lower() == "true"
    if tag == _TAG + "int":
        limit = payloads.int_digits()  # what every message, record and payload can write as text
        try:
            number = int(text[2:], 8) if text.startswith("0o") else int(text[2:], 16) if text.startswith("0x") \
                else int(text)
        except ValueError:  # more decimal digits than Python turns into a number
            number = None
        if number is None or payloads.too_many_digits(number):
            raise ValueError(f"an integer of more than {limit} digits; dsm takes integers of up to {limit} digits")
        return number
    if tag == _TAG + "float":
        lowered = text.lower()
        if lowered.endswith(".inf"):
            return float("-inf") if lowered.startswith("-") else float("inf")
        if lowered == ".nan":
            return float("nan")
        return float(text)
    raise ValueError(f"unsupported tag {tag!r}")


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.problems: list[Problem] = []
        self.count = 0

    def mark(self, node: yaml.Node) -> tuple[int, int]:
        return node.start_mark.line + 1, node.start_mark.column + 1

    def fail(self, node: yaml.Node, path: Key, message: str) -> None:
        line, col = self.mark(node)
        self.problems.append(Problem(self.doc.file, line, col, message, dotted(path)))

    def build(self, node: yaml.Node, path: Key, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge(node)
        if depth > MAX_DEPTH:
            raise _TooLarge(node, f"nesting deeper than {MAX_DEPTH} levels")
        self.doc.values[path] = self.mark(node)
        if isinstance(node, yaml.ScalarNode):
            try:
                return _scalar(node)
            except ValueError as exc:
                self.fail(node, path, str(exc))
                return None
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                self.fail(node, path, f"unsupported tag {node.tag!r}")
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                self.fail(node, path, f"unsupported tag {node.tag!r}")
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "merge":
                    self.fail(key_node, path, "merge keys (<<) are not part of YAML 1.2; write the keys out")
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self.fail(key_node, path, "mapping keys must be plain strings")
                    continue
                try:
                    key = _scalar(key_node)
                except ValueError as exc:
                    self.fail(key_node, path, str(exc))
                    continue
                if not isinstance(key, str):
                    self.fail(key_node, path, f"mapping key {key_node.value!r} must be a string (quote it)")
                    continue
                child = path + (key,)
                if key in out:
                    first = self.doc.keys[child]
                    self.fail(key_node, child, f"duplicate key {key!r} (first defined at line {first[0]})")
                    continue
                self.doc.keys[child] = self.mark(key_node)
                out[key] = self.build(value_node, child, depth + 1)
            return out
        raise AssertionError(f"unknown node {node!r}")


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node, what: str = ""):
        self.node = node
        self.what = what or f"more than {MAX_NODES} nodes once aliases are expanded"


def parse(text: str, file: str = "<string>", *, what: str = "machine definition") -> Document:
    """Parse one YAML document; raise DefinitionError with every problem's file:line:col.
    `what` names what a file holds one of, for the messages about none or several documents."""
    limit = max_definition_bytes()
    if len(text) > limit // 4:  # only then can its UTF-8 form be over the limit
        encoded = text.encode("utf-8", "surrogatepass")
        if len(encoded) > limit:
            raise DefinitionError(_too_large(file, encoded, limit))
    doc = Document(file=file, text=text, data=None)
    try:
        nodes = list(yaml.compose_all(text, Loader=_LOADER))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = " ".join(filter(None, [exc.context, exc.problem])) or str(exc)
        raise DefinitionError(Problem(file, line, col, f"invalid YAML: {reason}")) from None
    except yaml.reader.ReaderError as exc:
        position = exc.position
        line = text.count("\n", 0, position) + 1
        col = position - (text.rfind("\n", 0, position) + 1) + 1
        raise DefinitionError(Problem(file, line, col, f"invalid YAML: character {exc.character!r} is not "
                                      f"allowed ({exc.reason})")) from None
    except yaml.YAMLError as exc:
        raise DefinitionError(Problem(file, 1, 1, f"invalid YAML: {exc}")) from None
    except RecursionError:
        raise DefinitionError(Problem(file, 1, 1, "invalid YAML: nesting too deep")) from None
    if not nodes:
        article = "an" if what[:1] in "aeiou" else "a"
        raise DefinitionError(Problem(file, 1, 1, f"the file is empty; expected {article} {what}"))
    if len(nodes) > 1:
        line = nodes[1].start_mark.line + 1
        raise DefinitionError(Problem(file, line, 1, f"one {what} per file: found a second YAML document"))
    builder = _Builder(doc)
    try:
        doc.data = builder.build(nodes[0], ())
    except _TooLarge as exc:
        line, col = builder.mark(exc.node)
        raise DefinitionError(Problem(file, line, col, f"document too large: {exc.what}")) from None
    except RecursionError:
        raise DefinitionError(Problem(file, 1, 1, "document nested too deeply")) from None
    if builder.problems:
        raise DefinitionError(builder.problems)
    return doc


# A folder of definitions may hold other YAML too (a compose file, a CI pipeline). A machine file
# has a top-level `machine:` key, or points editors at the machine schema in a comment; a test file
# for `dsm test` names its machine at `machine:` too but has `cases:`.
_MACHINE_KEY = re.compile(r"""^["']?machine["']?[ \t]*:""", re.MULTILINE)
_CASES_KEY = re.compile(r"""^["']?cases["']?[ \t]*:""", re.MULTILINE)
_SCHEMA_COMMENT = re.compile(r"^#.*\$schema=\S*machine\.schema\.json", re.MULTILINE)


def looks_like_machine(path: str | Path) -> bool:
    """Whether a YAML file found in a folder is meant as a machine definition.

    Decided on the text, not the parsed YAML, so that a machine too broken to parse still counts
    and gets its errors reported; a file that cannot be read counts too, for the same reason.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return True
    if _SCHEMA_COMMENT.search(text):
        return True
    return bool(_MACHINE_KEY.search(text)) and not _CASES_KEY.search(text)


def read(path: str | Path, *, what: str = "machine definition") -> Document:
    """Read and parse a file; unreadable files become a located DefinitionError too."""
    name = str(path)
    limit = max_definition_bytes()
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)  # never more than the limit, whatever the file holds
    except OSError as exc:
        raise DefinitionError(Problem(name, 1, 1, f"cannot read file: {exc.strerror or exc}")) from None
    if len(raw) > limit:
        raise DefinitionError(_too_large(name, raw, limit))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DefinitionError(Problem(name, line, 1, "file is not valid UTF-8")) from None
    return parse(text, name, what=what)


def definitions_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the machine definitions, every *.yaml / *.yml file) found in a folder and below it, sorted;
    hidden files and folders (.git, .venv, ...) are not searched."""
    found = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [p for p in found if looks_like_machine(p)], found

