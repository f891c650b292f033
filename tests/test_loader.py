"""YAML 1.2 scalars, duplicate keys, positions, and hostile documents."""

from __future__ import annotations

import pytest

from dsm import loader
from dsm.errors import DefinitionError


def test_yaml_12_scalars_keep_on_off_yes_no_as_strings():
    doc = loader.parse("a: on\nb: off\nc: yes\nd: no\ne: true\nf: 010\ng: 0o10\nh: 0x1F\ni: 1.5\nj: ~\nk: 12:30\n")
    assert doc.data == {"a": "on", "b": "off", "c": "yes", "d": "no", "e": True, "f": 10, "g": 8, "h": 31,
                        "i": 1.5, "j": None, "k": "12:30"}


def test_yaml_11_only_forms_are_strings():
    doc = loader.parse("a: 1_000\nb: 0b101\nc: 2001-12-14\nd: Yes\n")
    assert doc.data == {"a": "1_000", "b": "0b101", "c": "2001-12-14", "d": "Yes"}


def test_on_as_a_mapping_key_is_the_string_on():
    doc = loader.parse("states:\n  s:\n    on:\n      yes: a\n      no: b\n")
    assert doc.data["states"]["s"]["on"] == {"yes": "a", "no": "b"}


def test_positions_of_keys_and_values():
    doc = loader.parse("machine: m\nstates:\n  first:\n    next: second\n")
    assert doc.keys[("states", "first")] == (3, 3)
    assert doc.values[("states", "first", "next")] == (4, 11)
    assert doc.where(("states", "first", "missing")) == (4, 5)  # the mapping that lacks it


def test_duplicate_key_is_reported_at_the_second_occurrence():
    with pytest.raises(DefinitionError) as info:
        loader.parse("machine: a\nstates:\n  s: {}\n  s: {}\n", "x.yaml")
    (problem,) = info.value.problems
    assert (problem.line, problem.col) == (4, 3)
    assert "duplicate key 's'" in problem.message and "line 3" in problem.message
    assert str(problem).startswith("x.yaml:4:3: error: ")


def test_every_duplicate_is_reported():
    with pytest.raises(DefinitionError) as info:
        loader.parse("a: 1\na: 2\nb: 1\nb: 2\n")
    assert [p.line for p in info.value.problems] == [2, 4]


def test_syntax_error_has_a_position():
    with pytest.raises(DefinitionError) as info:
        loader.parse("a: [1, 2\nb: 3\n", "bad.yaml")
    problem = info.value.problems[0]
    assert problem.file == "bad.yaml" and problem.line == 2
    assert "invalid YAML" in problem.message


@pytest.mark.parametrize("text", ["9" * 4301, "-" + "9" * 5000, "0x" + "F" * 5000, "0o" + "7" * 6000],
                         ids=["4301-digits", "negative", "hexadecimal", "octal"])
def test_integers_of_more_than_4300_digits_are_located(text):
    with pytest.raises(DefinitionError) as info:
        loader.parse(f"machine: m\nversion: {text}\n", "m.yaml")
    assert str(info.value) == "m.yaml:2:10: error: an integer of more than 4300 digits; dsm takes integers of up to " \
                              "4300 digits"


def test_integers_of_up_to_4300_digits_keep_their_value():
    data = loader.parse(f"a: {'9' * 4300}\nb: -{'9' * 4300}\nc: 0x{'F' * 3500}\n").data
    assert data == {"a": 10 ** 4300 - 1, "b": -(10 ** 4300 - 1), "c": 16 ** 3500 - 1}


def test_alias_bomb_is_refused():
    text = "a: &a [1,2,3,4,5,6,7,8,9]\n"
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    with pytest.raises(DefinitionError) as info:
        loader.parse(text)
    assert "too large" in info.value.problems[0].message


def test_non_string_keys_and_second_documents_are_refused():
    with pytest.raises(DefinitionError) as info:
        loader.parse("1: a\n")
    assert "must be a string" in info.value.problems[0].message
    with pytest.raises(DefinitionError) as info:
        loader.parse("a: 1\n---\nb: 2\n")
    assert "second YAML document" in info.value.problems[0].message
    assert info.value.problems[0].line == 3


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(DefinitionError) as info:
        loader.read(tmp_path / "missing.yaml")
    assert "cannot read file" in str(info.value)
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"machine: m\ndescription: caf\xe9\n")
    with pytest.raises(DefinitionError) as info:
        loader.read(bad)
    assert info.value.problems[0].line == 2 and "UTF-8" in info.value.problems[0].message


def test_empty_file():
    with pytest.raises(DefinitionError) as info:
        loader.parse("")
    assert "empty" in info.value.problems[0].message


def test_custom_tags_are_refused_on_keys_and_values():
    with pytest.raises(DefinitionError) as info:
        loader.parse("a: !custom 1\n!es x: b\n", "x.yaml")
    assert [(p.line, p.col) for p in info.value.problems] == [(1, 4), (2, 1)]
    assert all("unsupported tag" in p.message for p in info.value.problems)


@pytest.mark.parametrize("text,machine", [
    ("machine: m\nstart: a\n", True),
    ("# comment\nmachine: m\n", True),
    ('"machine": m\n', True),
    ("machine: m\nstates: [a, b\n", True),  # too broken to parse: still a machine, to be reported
    ("# yaml-language-server: $schema=../schemas/machine.schema.json\nstart: a\n", True),
    ("services:\n  work:\n    image: x\n", False),
    ("jobs:\n  machine: linux\n", False),  # not at the top level
    ("# yaml-language-server: $schema=https://json.schemastore.org/github-workflow.json\non: push\n", False),
    ("machine: ../definitions/order.yaml\ncases: []\n", False),  # a test file for `dsm test`
])
def test_looks_like_machine(tmp_path, text, machine):
    path = tmp_path / "f.yaml"
    path.write_text(text)
    assert loader.looks_like_machine(path) is machine
