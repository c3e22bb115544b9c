"""A fuzzer nobody here wrote: schemathesis generates requests from the
server's own /openapi.json and checks every answer against it: no 5xx, every
status documented, every body and content type as the document says, bad
input refused and good input accepted. The server is real (uvicorn on an
ephemeral port, started when this module is collected, since schemathesis
reads the document then); a scripted engine answers."""

from __future__ import annotations

import pytest
import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, settings

from scripted_engine import ScriptedEngine
from test_server import RunningServer

SERVER = RunningServer(ScriptedEngine({}, default=[("Hello", -0.5), (" there", -1.0)]), token="fuzz", max_new_tokens_cap=64)
schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{SERVER.port}/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def stop_the_server():
    yield
    SERVER.stop()


# Every check but one: livepp refuses some schema-valid requests for reasons
# JSON Schema cannot state (every message empty, top_logprobs without
# logprobs, more choices than the batch holds), with a 400 naming the field.
ACCEPTING_EVERY_SCHEMA_VALID_BODY = [checks.positive_data_acceptance]


@schema.parametrize()
@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_as_its_document_describes_it(case):
    case.call_and_validate(headers={"Authorization": "Bearer fuzz"}, excluded_checks=ACCEPTING_EVERY_SCHEMA_VALID_BODY, timeout=30)
