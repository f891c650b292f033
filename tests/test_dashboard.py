"""The web dashboard in a real browser: headless Chromium driven by Selenium, against a real
`dsm api` process and a real `dsm worker` over the suite's etcd.

What a user would check: an instance started through the API appears in the list and turns
`succeeded` there without a reload; a failed instance's page shows the traceback; redrive from
the page brings it to `succeeded`; a signal sent from the page wakes the instance that waits for
it; an API with a token has it asked for once, at the first action. Screenshots go to
$DSM_ARTIFACTS (or pytest's temporary folder) for a look after the run.

Needs Debian's `chromium` and `chromium-driver` (or any Chromium with a matching chromedriver on
PATH) and the `selenium` package: without them these tests are skipped, except when CI is set,
where they fail.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from clitools import ROOT, spawn
from helpers import until

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

WAIT = 60.0  # seconds a browser check may take on a loaded machine
# a page between two renders raises: look again
until_shown = functools.partial(until, timeout=WAIT, interval=0.05, retry_on=(Exception,))

GATE = """
machine: gate
description: Prepares, then waits for the signal go
start: prepare
states:
  prepare:
    tick: dashgate:prepare
    next: hold
  hold:
    signal: go
    next: done
  done:
    terminal: true
"""

GATE_PY = """
def prepare(payload, ctx):
    payload["prepared"] = True
"""

VOTE = """
machine: vote
description: Waits for a decision (approve or reject), then for a note
start: ask
states:
  ask:
    signal: decision
    on:
      approve: hold
      reject: rejected
  hold:
    signal: note
    next: done
  done:
    terminal: true
  rejected:
    terminal: true
    status: failed
"""

FLAKY = """
machine: flaky
description: Fails until the file named by payload.flag exists
start: work
states:
  work:
    tick: dashflaky:work
    next: done
  done:
    terminal: true
"""

FLAKY_PY = """
from pathlib import Path


def work(payload, ctx):
    if not Path(payload["flag"]).exists():
        raise RuntimeError("the flag file is missing")
    payload["worked"] = True
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the dashboard's browser tests need a browser in CI: {reason}")
    pytest.skip(f"no browser for the dashboard tests: {reason}")


def _browser_binaries() -> tuple[str, str]:
    """(Chromium, chromedriver) found on PATH, or the test is skipped (failed in CI) saying what is missing."""
    browser = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                    if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(what for what, path in (("chromium", browser), ("chromedriver", driver)) if path is None)
        _unavailable(f"{missing} not found (Debian: apt-get install chromium chromium-driver)")
    return browser, driver  # type: ignore[return-value]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    browser_path, driver_path = _browser_binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("the selenium package is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--force-prefers-reduced-motion"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as exc:  # a browser that does not start: say why
        _unavailable(f"chromium did not start: {exc}")
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $DSM_ARTIFACTS when set, else a temporary folder of this run."""
    given = os.environ.get("DSM_ARTIFACTS")
    folder = Path(given) if given else tmp_path_factory.mktemp("dashboard-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _Process:
    """A dsm process whose stderr is read on a thread (so it never blocks on a full pipe)."""

    def __init__(self, *args: str, **env: str) -> None:
        self.proc = spawn(*args, **env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        def matched() -> re.Match[str] | None:
            return next(filter(None, (re.search(pattern, line) for line in list(self.lines))), None)

        def told() -> str:
            return f"a line matching {pattern!r} from dsm; stderr:\n" + "\n".join(self.lines[-40:])

        until(lambda: matched() or self.proc.poll() is not None, told, timeout=timeout, interval=0.05)
        found = matched()
        if found is None:
            raise AssertionError(f"dsm exited without {told()}")
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


class Dashboard:
    """A `dsm api` process and a `dsm worker` process over one namespace of the suite's etcd."""

    def __init__(self, url: str, folder: Path, machines: tuple[str, ...], at: tuple[str, ...]) -> None:
        self.url = url
        self.folder = folder
        self.machines = machines  # the definition files
        self.at = at  # --etcd URL --namespace NS
        self.http = httpx.Client(base_url=url, timeout=30)

    def start(self, machine: str, payload: dict[str, Any]) -> str:
        answer = self.http.post(f"/api/machines/{machine}/instances", json={"payload": payload})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def record(self, instance_id: str) -> dict[str, Any]:
        answer = self.http.get(f"/api/instances/{instance_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())


@pytest.fixture(scope="module")
def dashboard(etcd: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    folder = tmp_path_factory.mktemp("dashboard")
    (folder / "gate.yaml").write_text(GATE.lstrip(), encoding="utf-8")
    (folder / "dashgate.py").write_text(GATE_PY.lstrip(), encoding="utf-8")
    (folder / "flaky.yaml").write_text(FLAKY.lstrip(), encoding="utf-8")
    (folder / "dashflaky.py").write_text(FLAKY_PY.lstrip(), encoding="utf-8")
    (folder / "vote.yaml").write_text(VOTE.lstrip(), encoding="utf-8")
    at = ("--etcd", etcd.endpoint, "--namespace", "dash" + os.urandom(4).hex())
    machines = (str(folder / "gate.yaml"), str(folder / "flaky.yaml"), str(folder / "vote.yaml"),
                str(ROOT / "definitions" / "order.yaml"))  # search attributes: customer, order
    worker = _Process("worker", *machines, *at, "--concurrency", "4", "--lease-ttl", "3", "--isolation", "thread")
    api = _Process("api", *machines, *at, "--host", "127.0.0.1", "--port", "0")
    try:
        board = Dashboard(_served_at(api), folder, machines, at)
        try:
            until_shown(lambda: len(board.http.get("/api/workers").json()["items"]) == 1,
                        "the worker to register itself")
        except AssertionError:
            raise AssertionError("no worker; its stderr:\n" + "\n".join(worker.lines[-30:])
                                 + "\nthe API's:\n" + "\n".join(api.lines[-30:])) from None
        yield board
        board.http.close()
    finally:
        api.stop()
        worker.stop()


def _served_at(api: _Process) -> str:
    """The URL a `dsm api --port 0` process says it serves."""
    return api.wait_for_line(r"^dsm api serving (http://127\.0\.0\.1:\d+) ").group(1)


def _js(browser: Any, script: str, *args: Any) -> Any:
    return browser.execute_script(script, *args)


def _open(browser: Any, url: str, *, live: bool = True) -> None:
    browser.get(url)
    _loaded(browser, live=live)


def _loaded(browser: Any, *, live: bool = True) -> None:
    """Waits for a page just loaded to follow live events (when `live`), after marking it."""
    # a mark that only this page load carries: it is gone if the page ever reloads
    _js(browser, "window.dsmTestLoad = 'same page'")
    if live:
        until_shown(lambda: _js(browser, "return document.getElementById('live').classList.contains('on')"),
               "the page to follow live events")


def _same_page(browser: Any) -> bool:
    return bool(_js(browser, "return window.dsmTestLoad === 'same page'"))


def _row_status(browser: Any, instance_id: str) -> str | None:
    return _js(browser, "const row = document.querySelector(`#instances tr[data-id='${arguments[0]}']`);"
                        "return row ? row.dataset.status : null;", instance_id)


def _page_status(browser: Any) -> str:
    return str(_js(browser, "const s = document.querySelector('#status'); return s ? s.textContent : '';"))


def _text(browser: Any, selector: str) -> str:
    return str(_js(browser, "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", selector))


def _rows(browser: Any) -> list[tuple[str, str, str]]:
    """(id, status, machine cell) of each row of the instance list, top to bottom."""
    found = _js(browser, "return [...document.querySelectorAll('#instances tr[data-id]')]"
                         ".map(tr => [tr.dataset.id, tr.dataset.status, tr.children[1].textContent])")
    return [tuple(r) for r in found]


def _shoot(browser: Any, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    browser.save_screenshot(str(path))
    return path


def test_an_instance_started_through_the_api_appears_and_goes_live_to_succeeded(
        browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    _open(browser, dashboard.url + "/")
    instance_id = dashboard.start("gate", {"order": 7})
    until_shown(lambda: _row_status(browser, instance_id) == "running", "the new instance to appear, running")
    until_shown(lambda: "waits for signal go" in _text(browser, f"#instances tr[data-id='{instance_id}']"),
           "the row to say what it waits for")
    _shoot(browser, artifacts, "list-running")

    answer = dashboard.http.post(f"/api/instances/{instance_id}/signals/go", json={"payload": {}})
    assert answer.status_code in (200, 202), answer.text
    until_shown(lambda: _row_status(browser, instance_id) == "succeeded", "the row to turn succeeded")
    assert _same_page(browser), "the list reloaded the page instead of updating in place"
    assert _text(browser, f"#instances tr[data-id='{instance_id}'] td:nth-child(4)").strip() == "done"
    _shoot(browser, artifacts, "list-succeeded")


def test_a_failed_instance_shows_its_traceback(browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    instance_id = dashboard.start("flaky", {"flag": str(dashboard.folder / "never-made")})
    _open(browser, f"{dashboard.url}/#/instances/{instance_id}")
    until_shown(lambda: _page_status(browser) == "failed", "the page to show the instance failed")
    error = until_shown(lambda: _text(browser, "#error"), "the error box")
    assert "RuntimeError in state work after 1 attempt: the flag file is missing" in error
    traceback = _text(browser, "#error pre.traceback")
    assert traceback.startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError("the flag file is missing")' in traceback
    assert "in work" in traceback
    until_shown(lambda: _js(browser, "return document.querySelector('#drawing svg')"), "the machine's drawing")
    assert _js(browser, "return document.getElementById('act-redrive').disabled") is False
    _shoot(browser, artifacts, "instance-failed")


def test_redrive_from_the_page_brings_a_failed_instance_to_succeeded(
        browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    flag = dashboard.folder / "redrive-flag"
    instance_id = dashboard.start("flaky", {"flag": str(flag)})
    _open(browser, f"{dashboard.url}/#/instances/{instance_id}")
    until_shown(lambda: _page_status(browser) == "failed", "the page to show the instance failed")
    flag.touch()  # what was wrong is fixed: the handler passes from now on
    browser.find_element("id", "act-redrive").click()
    until_shown(lambda: _page_status(browser) == "succeeded", "the page to show the redriven instance succeeded")
    assert _same_page(browser)
    assert "work→done" in _text(browser, "#history").replace(" ", "")
    assert dashboard.record(instance_id)["redrives"] == 1
    assert not _text(browser, "#error"), "the error box stays after the redrive"
    _shoot(browser, artifacts, "instance-redriven")


def test_a_signal_sent_from_the_page_wakes_the_instance(browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    instance_id = dashboard.start("gate", {})
    _open(browser, f"{dashboard.url}/#/instances/{instance_id}")
    until_shown(lambda: "Waits for signal go" in _text(browser, "#facts"),
                "the page to say what the instance waits for")
    browser.find_element("id", "act-signal").click()
    assert browser.find_element("id", "signal-name").get_attribute("value") == "go"  # offered: what it waits for
    browser.find_element("id", "action-ok").click()
    until_shown(lambda: _page_status(browser) == "succeeded", "the signalled instance to succeed")
    history = dashboard.record(instance_id)["history"]
    assert [entry["state"] for entry in history] == ["prepare", "hold"]
    assert history[1]["signal"]["name"] == "go"


def _options(browser: Any, select_id: str) -> list[tuple[str, str]]:
    """(value, text) of each option of a select, or [] when the element is not a select."""
    found = _js(browser, "const s = document.getElementById(arguments[0]);"
                         "return s && s.tagName === 'SELECT' ? [...s.options].map(o => [o.value, o.textContent]) : [];",
                select_id)
    return [tuple(o) for o in found]


def test_the_signal_form_offers_the_names_and_outcomes_the_machine_takes(
        browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    from selenium.webdriver.support.ui import Select

    instance_id = dashboard.start("vote", {})
    _open(browser, f"{dashboard.url}/#/instances/{instance_id}")
    until_shown(lambda: "Waits for signal decision" in _text(browser, "#facts"), "the page to say what it waits for")
    browser.find_element("id", "act-signal").click()
    assert browser.find_element("id", "signal-name").tag_name == "select", "the signal name is free text"
    until_shown(lambda: [v for v, _ in _options(browser, "signal-name")] == ["decision", "note"],
           "the form to offer the machine's signals")
    assert Select(browser.find_element("id", "signal-name")).first_selected_option.get_attribute("value") == \
        "decision"  # what the instance waits for now
    assert [v for v, _ in _options(browser, "signal-outcome")] == ["approve", "reject"]
    Select(browser.find_element("id", "signal-name")).select_by_value("note")
    until_shown(lambda: [v for v, _ in _options(browser, "signal-outcome")] == [""], "no outcome for note")
    Select(browser.find_element("id", "signal-name")).select_by_value("decision")
    until_shown(lambda: [v for v, _ in _options(browser, "signal-outcome")] == ["approve", "reject"],
           "the outcomes of decision again")
    Select(browser.find_element("id", "signal-outcome")).select_by_value("approve")
    _shoot(browser, artifacts, "signal-form")
    browser.find_element("id", "action-ok").click()
    until_shown(lambda: "Waits for signal note" in _text(browser, "#facts"), "the instance to wait for its note")
    browser.find_element("id", "act-signal").click()
    until_shown(lambda: Select(browser.find_element("id", "signal-name")).first_selected_option.get_attribute("value")
           == "note", "the form to offer what it waits for now")
    browser.find_element("id", "action-ok").click()
    until_shown(lambda: _page_status(browser) == "succeeded", "the instance to succeed")
    history = dashboard.record(instance_id)["history"]
    assert [(e["state"], e["signal"]["name"], e["signal"]["outcome"]) for e in history] == [
        ("ask", "decision", "approve"), ("hold", "note", None)]


def test_an_action_asks_for_the_token_once_and_the_tab_keeps_it(browser: Any, dashboard: Dashboard) -> None:
    token = "token-of-this-test"
    api = _Process("api", *dashboard.machines, *dashboard.at, "--host", "127.0.0.1", "--port", "0",
                   DSM_API_TOKEN=token)
    try:
        url = _served_at(api)
        flag = dashboard.folder / "token-flag"
        ids = [dashboard.start("flaky", {"flag": str(flag)}) for _ in range(2)]
        until_shown(lambda: all(dashboard.record(i)["status"] == "failed" for i in ids), "both instances to fail")
        flag.touch()
        _open(browser, f"{url}/#/instances/{ids[0]}")
        until_shown(lambda: _page_status(browser) == "failed", "the page to show the instance failed")

        def asks() -> bool:
            return bool(_js(browser, "return document.getElementById('token-dialog').open"))

        def answer(text: str) -> None:
            field = browser.find_element("id", "token-input")
            field.clear()
            field.send_keys(text)
            browser.find_element("css selector", "#token-dialog button[value=ok]").click()

        browser.find_element("id", "act-redrive").click()
        until_shown(asks, "the page to ask for the token")
        answer("not-the-token")
        until_shown(lambda: asks() and "refused" in _text(browser, "#token-dialog p"), "the page to say it was refused")
        answer(token)
        until_shown(lambda: _page_status(browser) == "succeeded", "the redriven instance to succeed")
        assert _js(browser, "return sessionStorage.getItem('dsm.api.token')") == token

        _open(browser, f"{url}/#/instances/{ids[1]}")  # the same tab: the token is not asked for again
        until_shown(lambda: _page_status(browser) == "failed", "the second instance's page")
        browser.find_element("id", "act-redrive").click()
        until_shown(lambda: _page_status(browser) == "succeeded", "the second redriven instance to succeed")
        assert not asks()
    finally:
        api.stop()


def test_the_list_filters_by_status_and_machine_and_pages(browser: Any, dashboard: Dashboard) -> None:
    ids = [dashboard.start("flaky", {"flag": str(dashboard.folder / "never-made")}) for _ in range(3)]
    until_shown(lambda: all(dashboard.record(i)["status"] == "failed" for i in ids), "three instances to fail")
    _open(browser, f"{dashboard.url}/#/?status=failed&machine=flaky&limit=2")
    rows = functools.partial(_rows, browser)
    first = until_shown(lambda: len(rows()) == 2 and rows(), "a first page of two")
    assert [(i, s, m.split()[0]) for i, s, m in first] == [(ids[2], "failed", "flaky"), (ids[1], "failed", "flaky")]
    browser.find_element("id", "page-older").click()
    second = until_shown(lambda: rows() and rows()[0][0] == ids[0] and rows(), "the next page")
    assert all(status == "failed" for _, status, _ in second)
    browser.find_element("id", "page-newer").click()
    until_shown(lambda: [r[0] for r in rows()] == [ids[2], ids[1]], "the first page again")
    browser.find_element("css selector", ".chips button[data-status=running]").click()
    until_shown(lambda: "status=running" in browser.current_url and all(r[1] == "running" for r in rows()),
           "only running instances of flaky (none)")
    assert until_shown(lambda: _text(browser, "#instances .empty"), "the empty list to say so") == \
        "No running instances of machine flaky."
    assert _same_page(browser)


def test_the_start_form_starts_an_instance_and_opens_its_page(browser: Any, dashboard: Dashboard) -> None:
    _open(browser, f"{dashboard.url}/#/start?machine=gate", live=False)
    until_shown(lambda: _js(browser, "return document.getElementById('start-machine').value") == "gate",
           "the form to offer the machine named in the address")
    payload = browser.find_element("id", "start-payload")
    payload.clear()
    payload.send_keys('{"order": [1, 2]')  # not JSON: said, and nothing starts
    browser.find_element("id", "start-submit").click()
    assert "the payload is not JSON" in until_shown(lambda: _text(browser, ".notice.error"), "the form to refuse it")
    payload.send_keys("}")
    browser.find_element("id", "start-submit").click()
    until_shown(lambda: _page_status(browser) == "running", "the new instance's page")
    instance_id = _text(browser, "#instance-id")
    assert dashboard.record(instance_id)["input"] == {"order": [1, 2]}
    until_shown(lambda: "Waits for signal go" in _text(browser, "#facts"), "the page to say what it waits for")


def _schedule_text(browser: Any, name: str, selector: str = "") -> str:
    return _text(browser, f".schedule[data-name='{name}'] {selector}".strip())


def test_the_schedules_page_shows_next_due_times_runs_and_pauses(
        browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    body = {"name": "nightly", "machine": "gate", "cron": "30 2 * * *", "timezone": "Europe/Berlin",
            "payload": {"order": 1}}
    created = dashboard.http.post("/api/schedules", json=body)
    assert created.status_code == 201, created.text
    _open(browser, f"{dashboard.url}/#/schedules", live=False)
    until_shown(lambda: "nightly" in _schedule_text(browser, "nightly", "h2"), "the schedule's panel")
    assert "cron 30 2 * * * (Europe/Berlin)" in _schedule_text(browser, "nightly")
    assert _js(browser, "return document.querySelectorAll(\".schedule[data-name='nightly'] .next .tag\").length") == 5

    browser.find_element("css selector", ".schedule[data-name='nightly'] button.trigger").click()
    until_shown(lambda: "triggered" in _schedule_text(browser, "nightly", ".runs"), "the run started from the page")
    run_id = _schedule_text(browser, "nightly", ".runs tbody tr td:nth-child(3)").strip()
    assert run_id.startswith("nightly-")
    assert dashboard.record(run_id)["machine"] == "gate"
    _shoot(browser, artifacts, "schedules")

    paused = dashboard.http.post("/api/schedules/nightly/pause", json={"note": "quiet week"})
    assert paused.status_code == 200, paused.text
    until_shown(lambda: "Paused: quiet week" in _schedule_text(browser, "nightly"), "the pause and its note")
    assert "none while paused" in _schedule_text(browser, "nightly", ".next")
    browser.find_element("css selector", ".schedule[data-name='nightly'] button.unpause").click()
    until_shown(lambda: "paused" not in _schedule_text(browser, "nightly", ".title"), "the schedule unpaused")
    browser.find_element("css selector", ".schedule[data-name='nightly'] .runs a").click()
    until_shown(lambda: _page_status(browser) in ("running", "succeeded"), "the run's instance page")
    _shoot(browser, artifacts, "schedule-run")


def _address(browser: Any) -> dict[str, list[str]]:
    """The list's filters as the page's address keeps them (the query after `#/`)."""
    return parse_qs(urlsplit(browser.current_url).fragment.partition("?")[2])


def _search(browser: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element("id", "search")
    box.clear()
    box.send_keys(text + Keys.ENTER)


def test_the_search_box_lists_instances_by_attribute_and_opens_one_by_id(
        browser: Any, dashboard: Dashboard, artifacts: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    c7 = [dashboard.start("order", {"customer": "c7", "order_id": f"A-{n}", "total": total})
          for n, total in enumerate((120, 0, 40))]
    others = [dashboard.start("order", {"customer": "c8", "total": 120}), dashboard.start("order", {"total": 40})]
    until_shown(lambda: all(dashboard.record(i)["status"] != "running" for i in c7 + others), "the orders to finish")
    assert [dashboard.record(i)["status"] for i in c7] == ["succeeded", "failed", "succeeded"]  # a total of 0 fails

    def ids() -> list[str]:
        return [row[0] for row in _rows(browser)]

    _open(browser, f"{dashboard.url}/#/")
    _search(browser, "customer=c7")
    until_shown(lambda: ids() == c7[::-1], lambda: f"exactly c7's orders, newest first; shown: {ids()}")
    assert _address(browser) == {"where": ["customer:c7"]}
    assert _text(browser, "#search-active").startswith("customer = c7")
    assert _same_page(browser)
    _shoot(browser, artifacts, "search")

    browser.find_element("css selector", ".chips button[data-status=failed]").click()
    until_shown(lambda: ids() == [c7[1]], lambda: f"c7's failed order only; shown: {ids()}")
    assert _address(browser) == {"status": ["failed"], "where": ["customer:c7"]}

    browser.refresh()  # the address keeps the search
    _loaded(browser)
    until_shown(lambda: ids() == [c7[1]], lambda: f"c7's failed order after the reload; shown: {ids()}")
    assert browser.find_element("id", "search").get_attribute("value") == "customer=c7"
    _shoot(browser, artifacts, "search-failed")

    # Live: an order of another customer does not come into the list; one of c7's does.
    browser.find_element("css selector", ".chips button[data-status='']").click()
    until_shown(lambda: ids() == c7[::-1], "c7's orders of every status")
    other = dashboard.start("order", {"customer": "c8", "total": 40})
    until_shown(lambda: dashboard.record(other)["status"] == "succeeded", "c8's new order to finish")
    late = dashboard.start("order", {"customer": "c7", "total": 40})
    until_shown(lambda: _row_status(browser, late) == "succeeded", "c7's new order to come in and succeed")
    assert ids() == [late, *c7[::-1]]
    assert _same_page(browser), "the list reloaded the page instead of reading the API again"

    browser.find_element("id", "search").send_keys(Keys.ESCAPE)  # clears the search, the other filters kept
    until_shown(lambda: other in ids(), "every instance listed again")
    assert "where" not in _address(browser)
    assert browser.find_element("id", "search").get_attribute("value") == ""

    _search(browser, c7[0])  # an id: its page
    until_shown(lambda: _page_status(browser) == "succeeded", "the instance's page")
    assert _text(browser, "#instance-id") == c7[0]

    _open(browser, f"{dashboard.url}/#/?status=failed&where=customer:c7")
    until_shown(lambda: ids() == [c7[1]], "c7's failed order")
    _search(browser, "no-such-order")
    note = until_shown(lambda: _text(browser, "#search-note"), "the page to say there is no such instance")
    assert note.startswith("No instance no-such-order.")
    assert _address(browser) == {"status": ["failed"], "where": ["customer:c7"]} and ids() == [c7[1]]
    _shoot(browser, artifacts, "search-unknown-id")

    _search(browser, "customer=c7, order=A-1")  # several attributes: all must hold
    until_shown(lambda: _address(browser).get("where") == ["customer:c7", "order:A-1"], "both in the address")
    until_shown(lambda: ids() == [c7[1]], "c7's order A-1")
    browser.find_element("css selector", "#search-active .tag[data-name=order] button").click()  # one tag cleared
    until_shown(lambda: _address(browser) == {"status": ["failed"], "where": ["customer:c7"]}, "order no more")
    assert browser.find_element("id", "search").get_attribute("value") == "customer=c7"
    _search(browser, "customer=c7 order=A-2")
    assert until_shown(lambda: _text(browser, "#instances .empty"), "the empty list to say so") == \
        "No failed instances with customer = c7 and order = A-2."
    _search(browser, "customer=" + "x" * 300)  # refused by the API: its message
    error = until_shown(lambda: _text(browser, ".notice.error"), "the API's refusal")
    assert "where: customer: a value is a string, a number or a boolean of up to 256 characters" in error
    assert _same_page(browser)
