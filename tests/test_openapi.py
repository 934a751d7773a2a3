"""The API's description, service/openapi.yaml: valid OpenAPI 3.1, the same operations as the app's router,
served at GET /openapi.json, and true of a real service process (a bounded schemathesis fuzz)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from reliability.fuzz import EXAMPLE_ACCOUNT, run_fuzz, summary
from support import ROOT, database_fixtures, service_process

from service.app import create_app
from service.config import Config

DOCUMENT = ROOT / "service" / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")
# No key needed for these (the rest need a bearer key).
PUBLIC = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/openapi.json")}

# The fuzz: one round from a fixed seed (the same cases on every run), a few examples per operation and mode;
# FUZZ_SECONDS only caps a machine far slower than this one.
FUZZ_SEED = 20_251_201
FUZZ_EXAMPLES = 30
FUZZ_SECONDS = 100

database_url, service_url, pool, session_key = database_fixtures("module", "bps_openapi_test")


def document() -> dict:
    return yaml.safe_load(DOCUMENT.read_text())


def operations(spec: dict) -> dict[tuple[str, str], dict]:
    return {
        (method.upper(), path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def routed() -> set[tuple[str, str]]:
    """The app's routes as (method, path template); HEAD, which aiohttp adds to every GET, left out."""
    app = create_app(Config(database_url="postgresql://unused"))
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        # A template's regex ({id:(?!bulk$)[^/]+}) is the document's plain {id}.
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical)
        routes.add((route.method, path))
    return routes


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = document()
    assert spec["openapi"].startswith("3.1.")
    try:
        validate(spec)
    except OpenAPIValidationError as error:
        pytest.fail(f"service/openapi.yaml is not valid OpenAPI 3.1: {error}")


def test_every_route_is_documented_and_every_operation_is_routed() -> None:
    documented = set(operations(document()))
    app = routed()
    assert app - documented == set(), "routes of the app that service/openapi.yaml does not describe"
    assert documented - app == set(), "operations of service/openapi.yaml that the app does not route"


def test_every_operation_says_its_security_request_id_and_problems() -> None:
    spec = document()
    for (method, path), operation in operations(spec).items():
        label = f"{method} {path}"
        responses = operation["responses"]
        if (method, path) in PUBLIC:
            assert operation.get("security") == [], label
        else:
            (requirement,) = operation.get("security", spec["security"])
            assert list(requirement) == ["bearerAuth"], label
            assert {"401", "403", "503"} <= set(responses), label
        for status, response in responses.items():
            response = resolve(spec, response)
            assert "X-Request-Id" in response.get("headers", {}), f"{label} {status}: no X-Request-Id"
            if int(status) >= 400:
                assert list(response["content"]) == ["application/problem+json"], f"{label} {status}"
        if "503" in responses:
            assert "Retry-After" in resolve(spec, responses["503"])["headers"], label
        if "401" in responses:
            assert "WWW-Authenticate" in resolve(spec, responses["401"])["headers"], label


def resolve(spec: dict, item: dict) -> dict:
    while "$ref" in item:
        node = spec
        for part in item["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        item = node
    return item


def test_the_intake_takes_json_and_pain001_and_answers_location() -> None:
    spec = document()
    for path in ("/bulk_transfer", "/transfers/bulk"):
        operation = spec["paths"][path]["post"]
        body = resolve(spec, operation["requestBody"])
        assert {"application/json", "application/xml", "text/xml"} <= set(body["content"]), path
        created = resolve(spec, operation["responses"]["201"])
        assert {"Location", "Idempotent-Replayed", "X-Request-Id"} <= set(created["headers"]), path
        names = {resolve(spec, p)["name"] for p in operation["parameters"]}
        assert "Idempotency-Key" in names, path


async def test_get_openapi_json_serves_the_document(make_client) -> None:
    client = await make_client(key=None)
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert json.loads(await response.read()) == document()


@pytest.fixture(scope="module")
async def fuzz_key(pool) -> str:
    """A key with both scopes for the account the document's examples debit, well funded."""
    name, iban, bic = EXAMPLE_ACCOUNT
    account = await pool.fetchval("SELECT bps.create_bank_account($1, $2, $3, 10000000000)", name, iban, bic)
    return await pool.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], 'openapi fuzz')", account)


@pytest.fixture(scope="module")
def service(database_url: str):
    process = service_process(database_url, BPS_ACCESS_LOG="0")
    process.start()
    yield process
    process.stop()


def test_a_bounded_fuzz_finds_no_5xx_and_no_answer_the_document_does_not_describe(
    service, fuzz_key: str, capsys
) -> None:
    figures = run_fuzz(service.url, fuzz_key, FUZZ_SECONDS, FUZZ_SEED, max_examples=FUZZ_EXAMPLES, rounds=1)
    report = summary(figures)
    with capsys.disabled():
        print(f"\n{report}")
    assert figures["operations"] == len(operations(document())), report
    assert figures["cases"] >= 300 and figures["link_steps"] > 0, report
    assert figures["statuses"].get("201", 0) > 0 and figures["statuses"].get("200", 0) > 0, report
    assert figures["server_errors"] == 0 and figures["served_5xx"] == 0, report
    assert figures["violations"] == 0, report
    assert figures["errors"] == [], report
