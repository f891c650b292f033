"""The HTTP API against its own OpenAPI document, as schemathesis checks it.

schemathesis reads `/api/openapi.json` from a live `dsm api`, makes requests from it (valid ones,
which the API must take, and ones the document forbids, which it must refuse, for every
operation, with methods it does not list and without the token), sends them over HTTP and checks
each answer with all its checks: status, content type, headers and body as documented, no 5xx,
`Allow` on OPTIONS and 405, the token asked for where the document says. Once with a token on a
real etcd, once without one on the memory store: the document says which it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from apiserver import ApiServer
from clitools import ROOT
from hypothesis import HealthCheck, settings

from dsm import compiler

DEFINITIONS = ROOT / "definitions"
TOKEN = "conformance-token"
# Few examples an operation: the coverage phase sends each documented boundary and each kind of
# invalid value besides, so both servers take some 20 seconds on two cores. The same examples every
# run (derandomize): a failure here is a change of the API or of its document, not luck.
EXAMPLES = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _config(token: str | None) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "request-timeout": 10,
        # the token goes where the document asks for it (and its checks leave it out to see a 401)
        **({"auth": {"openapi": {"bearer": {"bearer": token}}}} if token else {}),
        "operations": [{
            # the event stream never ends: read its first events (ready, then the instance's
            # record with ?instance=), and give up waiting for more soon
            "include-name": "GET /api/events", "request-timeout": 1.0, "max-stream-events": 2,
        }, {
            # a signal valid by the document may still be one the instance's machine does not take
            # (SPEC 3): its 422 is documented, and not a refusal of data the document admits
            "include-name": "POST /api/instances/{id}/signals/{name}",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409",
                                                                          "422"]}},
        }, {
            # a schedule's fields valid by the document may still say no schedule (a cron expression,
            # a time zone, a duration that is none): its 422 is documented; so is a backfill's span
            "include-name-regex": "^(POST|PUT) /api/schedules",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409",
                                                                          "422"]}},
        }],
    })


def _served(srv: ApiServer, token: str | None) -> Any:
    return schemathesis.openapi.from_url(f"{srv.url}/api/openapi.json", config=_config(token))


GRAPHS = [compiler.load(DEFINITIONS / "order.yaml"), compiler.load(DEFINITIONS / "approval.yaml")]


@pytest.fixture
def api_with_token(etcd: Any, namespace: str) -> Iterator[Any]:
    with ApiServer(etcd=etcd.endpoint, namespace=namespace, graphs=GRAPHS, token=TOKEN, heartbeat=0.2) as srv:
        yield _served(srv, TOKEN)


@pytest.fixture
def api_without_token() -> Iterator[Any]:
    with ApiServer(graphs=GRAPHS, heartbeat=0.2) as srv:
        yield _served(srv, None)


@pytest.mark.long  # the same fuzzing as without a token, with one: 16 s
@pytest.mark.etcd
@schemathesis.pytest.from_fixture("api_with_token").parametrize()
@EXAMPLES
def test_the_api_with_a_token_on_etcd_is_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate()


@schemathesis.pytest.from_fixture("api_without_token").parametrize()
@EXAMPLES
def test_the_api_without_a_token_is_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate()
