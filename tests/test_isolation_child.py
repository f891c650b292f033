"""A handler process's own parts, without a process."""

from __future__ import annotations

import json

from dsm.worker.isolation.child import ChildOptions


def test_a_handler_process_reads_back_the_options_it_is_started_with() -> None:
    options = ChildOptions(path=("/srv/app", "/usr/lib/python3"), search=("/srv/handlers",), ppid=4242, level=20,
                           handler_level=10, text_format="dsm: %(message)s", log={"format": "json", "worker": "w-1"},
                           preload=("shop.orders",))
    assert ChildOptions.from_json(json.loads(options.to_json())) == options
    assert json.loads(options.to_json())["path"] == ["/srv/app", "/usr/lib/python3"]  # what BOOT reads first

