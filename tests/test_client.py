"""The public client (`dsm.Client`, `dsm.AsyncClient`) and how it is configured."""

from __future__ import annotations

import pytest

from dsm.errors import InputError
from dsm.store.etcd import EtcdOptions


def test_etcd_endpoints_are_a_comma_separated_string_or_a_list():
    joined = EtcdOptions.build("http://127.0.0.1:2379,http://127.0.0.2:2380")
    listed = EtcdOptions.build(["http://127.0.0.1:2379", "http://127.0.0.2:2380"])
    assert listed == joined and listed.display == "http://127.0.0.1:2379,http://127.0.0.2:2380"
    with pytest.raises(InputError, match="mix of http and https"):
        EtcdOptions.build(("127.0.0.1", "https://h:1"))
    with pytest.raises(InputError, match="no endpoint"):
        EtcdOptions.build([])
    with pytest.raises(InputError, match="a string or a list of strings"):
        EtcdOptions.build([2379])  # type: ignore[list-item]
