"""Schema-driven fuzzing of a running BPS from the OpenAPI document it serves, with schemathesis's Python API.

Per operation of the document: its examples, then generated cases (positive: what the schema allows;
negative: what it forbids), then sequences along the document's links (post a bulk transfer, read it,
cancel it, read its first transfer). Requests carry a valid API key (negative cases may replace it), and
every other valid bulk transfer debits the example account, so that they reach the business rules; the
ignored_auth check also resends each answered request without the key. Every answer is checked (CHECKS):
no 5xx, a documented status, content type, headers and body schema. Failures are counted, not raised, so
one run reports them all and hypothesis neither stops nor shrinks.

tests/test_openapi.py runs `run_fuzz` briefly on every `make test`; `make reliability` runs it for longer.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity
from hypothesis.errors import Flaky, Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

# The account the document's examples debit: a fuzzed database needs it, with the key covering it.
EXAMPLE_ACCOUNT = ("ACME Corp", "FR10474608000002006107XXXXX", "OIVUSCLQXXX")

# Not positive_data_acceptance: a schema-valid bulk transfer is rightly a 422 when it asks more than the
# balance or names another organization or currency than the account's, which no schema can hold.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
# Checks that look back along a stateful sequence (a cancelled or read resource stays consistent).
STATEFUL_CHECKS = [*CHECKS, use_after_free, ensure_resource_availability]
# Failures that mean the document and the answer disagree.
CONFORMANCE_FAILURES = {
    "UndefinedStatusCode",
    "MissingHeaders",
    "JsonSchemaError",
    "MissingContentType",
    "MalformedMediaType",
    "UndefinedContentType",
    "ContentDeserializationError",
    "MalformedJson",
}
REQUEST_TIMEOUT = 30
# Cases per operation and mode in a round of a long run: a round (about a minute here) ends with its links.
ROUND_EXAMPLES = 50


@dataclass
class Figures:
    """What a fuzz sent and found."""

    seed: int
    requests: int = 0  # HTTP requests the fuzz sent on its session (the cases and the checks' own)
    cases: int = 0  # cases sent (generated, examples, steps of sequences)
    link_steps: int = 0  # of those, steps of sequences along links
    link_replays: int = 0  # link runs hypothesis ended because a replay drew differently (see fuzz_links)
    served: int = 0  # requests the service counted in GET /metrics (the auth probes included)
    served_5xx: int = 0  # of those, answered with a 5xx
    statuses: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)  # problem answers by status and code
    server_errors: int = 0  # answers with a 5xx status
    violations: int = 0  # failed checks (a 5xx included)
    schema_violations: int = 0  # of those, answers that break the document
    failures: dict = field(default_factory=dict)  # (operation, kind): [count, first message]
    errors: list = field(default_factory=list)  # what kept a case from being tested
    operations: int = 0
    seconds: float = 0.0

    def count(self, response: requests.Response, *_, **__) -> None:
        """A requests response hook: every answer, whoever sent it."""
        self.requests += 1
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.server_errors += 1
        if response.headers.get("Content-Type", "").startswith("application/problem+json"):
            try:
                code = response.json().get("code")
            except (ValueError, AttributeError):
                code = "unreadable"
            self.problems[f"{response.status_code} {code}"] += 1

    def fail(self, operation: str, failure: Failure) -> None:
        kind = type(failure).__name__
        self.violations += 1
        self.schema_violations += kind in CONFORMANCE_FAILURES
        message = " | ".join(
            line.strip() for line in f"{failure.title}: {failure.message}".splitlines() if line.strip()
        )
        self.failures.setdefault((operation, kind), [0, message[:600]])[0] += 1

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "seconds": round(self.seconds, 1),
            "operations": self.operations,
            "cases": self.cases,
            "link_steps": self.link_steps,
            "link_replays": self.link_replays,
            "requests": self.requests,
            "served": self.served,
            "served_5xx": self.served_5xx,
            "server_errors": self.server_errors,
            "violations": self.violations,
            "schema_violations": self.schema_violations,
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
            "problems": dict(sorted(self.problems.items())),
            "failures": [f"{op}: {kind} x{n}: {message}" for (op, kind), (n, message) in self.failures.items()],
            "errors": self.errors[:20],
        }


def summary(figures: dict) -> str:
    """The figures as a few lines for a test's or a run's output."""
    lines = [
        f"schemathesis fuzz (seed {figures['seed']}): {figures['requests']} requests sent, {figures['served']} served "
        f"({figures['cases']} cases, {figures['link_steps']} of them along links, {figures['link_replays']} link runs"
        f" ended by a replay; {figures['operations']} operations)"
        f" in {figures['seconds']}s; 5xx: {figures['server_errors']} (served: {figures['served_5xx']}); "
        f"violations: {figures['violations']} (of the document: {figures['schema_violations']})",
        "  statuses: " + ", ".join(f"{status}: {n}" for status, n in figures["statuses"].items()),
        "  problems: " + ", ".join(f"{problem}: {n}" for problem, n in figures["problems"].items()),
    ]
    lines += [f"  FAIL {failure}" for failure in figures["failures"]]
    lines += [f"  ERROR {error}" for error in figures["errors"]]
    return "\n".join(lines)


def load_schema(base_url: str, api_key: str) -> schemathesis.BaseSchema:
    """The document the service serves, set to send the key wherever it asks for one. Read here rather than
    by from_url, which would leave out the operation that serves it."""
    served_document = requests.get(f"{base_url}/openapi.json", timeout=REQUEST_TIMEOUT)
    served_document.raise_for_status()
    return schemathesis.openapi.from_dict(served_document.json(), config=fuzz_config(base_url, api_key))


def fuzz_config(base_url: str, api_key: str) -> schemathesis.Config:
    """NUL-free strings: PostgreSQL text cannot hold NUL, and such a body is a documented 400 that the
    hostile-input tests cover."""
    return schemathesis.Config.from_dict(
        {
            "base-url": base_url,
            "auth": {"openapi": {"bearerAuth": {"bearer": api_key}}},
            "generation": {"allow-x00": False},
        }
    )


def settings(max_examples: int) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,  # the seed decides (a CI profile would otherwise fix one of its own)
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        stateful_step_count=6,
    )


def run_fuzz(
    base_url: str,
    api_key: str,
    seconds: float,
    seed: int,
    *,
    max_examples: int | None = None,
    rounds: int | None = None,
) -> dict:
    """Fuzzes the service at `base_url` for at most `seconds` from `seed` (the same seed sends the same cases);
    returns the figures (see Figures.as_dict). Rounds repeat, each from the next seed, until `rounds` are done
    or time is up; `max_examples` (per operation and mode in a round) sizes them."""
    started = time.monotonic()
    deadline = started + seconds
    figures = Figures(seed)
    schema = load_schema(base_url, api_key)
    operations = []
    for result in schema.get_all_operations():
        try:
            operations.append(result.ok())
        except Exception as error:  # an operation the document describes wrongly
            figures.errors.append(f"{type(error).__name__}: {error}")
    figures.operations = len(operations)
    per_round = max_examples or ROUND_EXAMPLES
    session = requests.Session()
    session.hooks["response"].append(figures.count)
    served_before = served(base_url)
    try:
        for operation in operations:
            for strategy in operation.get_strategies_from_examples():
                fuzz_strategy(operation.label, strategy, 1, seed, deadline, session, figures)
        modes = [(op, mode) for op in operations for mode in schemathesis.GenerationMode]
        round_seed = seed
        while time.monotonic() < deadline and (rounds is None or round_seed < seed + rounds):
            for operation, mode in list(modes):
                strategy = operation.as_strategy(generation_mode=mode)
                if not fuzz_strategy(operation.label, strategy, per_round, round_seed, deadline, session, figures):
                    modes.remove((operation, mode))
            fuzz_links(schema, max(2, per_round // 2), round_seed, deadline, session, figures)
            round_seed += 1
    finally:
        session.close()
    served_after = served(base_url)
    # The first scrape is counted in the second.
    figures.served = served_after[0] - served_before[0] - 1
    figures.served_5xx = served_after[1] - served_before[1]
    figures.seconds = time.monotonic() - started
    return figures.as_dict()


def served(base_url: str) -> tuple[int, int]:
    """The requests the service has answered, and how many with a 5xx, by its GET /metrics (every worker's)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base_url}/metrics", timeout=REQUEST_TIMEOUT).text
    total = errors = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bps_http_requests_total":
                total += int(sample.value)
                errors += int(sample.value) if sample.labels.get("status", "").startswith("5") else 0
    return total, errors


class TimeUp(Exception):
    """Raised in a hypothesis test to end it at the deadline (no shrinking phase: it just stops)."""


def fuzz_strategy(label: str, strategy, max_examples: int, seed: int, deadline: float, session, figures) -> bool:
    """Sends up to `max_examples` cases of `strategy`, stopping at the deadline; False when it has none to
    give."""
    if time.monotonic() >= deadline:
        return True

    @hypothesis.seed(seed)
    @settings(max_examples)
    @hypothesis.given(case=strategy)
    def test(case) -> None:
        if time.monotonic() >= deadline:
            raise TimeUp
        exercise(label, case, session, figures)

    try:
        test()
    except TimeUp:
        pass
    except Unsatisfiable:  # nothing to negate (an operation without parameters or body)
        return False
    except Exception as error:  # generation itself failed: the document is at fault
        figures.errors.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
    return True


def exercise(label: str, case, session, figures, recorder=None, checks=CHECKS):
    """Sends one case and checks its answer; the response, or None when there was none."""
    figures.cases += 1
    aim_at_account(case)
    try:
        response = case.call(session=session, timeout=REQUEST_TIMEOUT, **body_of(case))
    except requests.RequestException as error:
        figures.errors.append(f"{label}: no answer: {type(error).__name__}")
        return None
    except Exception as error:  # a case schemathesis cannot send: the fuzz's problem, not the service's
        figures.errors.append(f"{label}: not sent: {type(error).__name__}: {str(error)[:200]}")
        return None
    validate(label, case, response, session, figures, recorder, checks)
    return response


def validate(label: str, case, response, session, figures, recorder=None, checks=CHECKS) -> None:
    """Runs `checks` on an answer, counting each failure."""
    try:
        case.validate_response(
            response,
            checks=checks,
            transport_kwargs={"session": session, "timeout": REQUEST_TIMEOUT},
            recorder=recorder,
        )
    except FailureGroup as group:
        for failure in group.exceptions:
            figures.fail(label, failure)
    except Failure as failure:
        figures.fail(label, failure)
    except requests.RequestException as error:
        figures.errors.append(f"{label}: a check's request got no answer: {type(error).__name__}")


def aim_at_account(case) -> None:
    """Every other schema-valid JSON bulk transfer debits the example account (its IBAN, BIC, name and
    currency), so that it reaches the business rules (funds, duplicates, idempotency) instead of stopping at
    404 account_not_found. Which ones is decided by the case itself: the same seed, the same requests."""
    body = case.body
    positive = case.meta is None or case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
    if not (positive and case.media_type == "application/json" and isinstance(body, dict)):
        return
    if not isinstance(body.get("credit_transfers"), list) or zlib.crc32(repr(body).encode()) % 2:
        return
    name, iban, bic = EXAMPLE_ACCOUNT
    body.update(organization_iban=iban, organization_bic=bic)
    if "organization_name" in body:
        body["organization_name"] = name
    for item in body["credit_transfers"]:
        if isinstance(item, dict) and "currency" in item:
            item["currency"] = "EUR"
    body.pop("requested_execution_date", None)


def body_of(case) -> dict:
    """How the body goes out when schemathesis would not send it as the service reads it: a pain.001 file as
    its own text (not wrapped in an element), a JSON body gzip-compressed when the case's Content-Encoding
    says gzip."""
    media_type = case.media_type or ""
    encoding = str((case.headers or {}).get("Content-Encoding", "")).strip().lower()
    if media_type in ("application/xml", "text/xml") and isinstance(case.body, str):
        return {"data": case.body.encode()}
    if media_type == "application/json" and encoding == "gzip" and not isinstance(case.body, NotSet):
        return {"data": gzip.compress(json.dumps(case.body, default=str).encode(), mtime=0)}
    return {}


def fuzz_links(schema, max_examples: int, seed: int, deadline: float, session, figures) -> None:
    """Sequences along the document's links, each step checked (STATEFUL_CHECKS)."""
    if time.monotonic() >= deadline:
        return
    base = schema.as_state_machine()

    class Links(base):
        def step(self, input):
            if time.monotonic() >= deadline:
                raise TimeUp
            return super().step(input)

        def call(self, case, **kwargs):
            figures.cases += 1
            figures.link_steps += 1
            aim_at_account(case)
            return case.call(session=session, timeout=REQUEST_TIMEOUT, **body_of(case))

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            validate(f"links: {case.operation.label}", case, response, session, figures, self.recorder, STATEFUL_CHECKS)

    try:
        hypothesis.seed(seed)(Links)
        Links.run(settings=settings(max_examples))
    except TimeUp:
        pass
    except Flaky:
        # Hypothesis replays a sequence's choices and finds it draws differently: the server's state moved on (a
        # payload accepted once is a 409 the next time, so a link is not followed). Every step was checked as it
        # ran; schemathesis's own runner ends such a run the same way.
        figures.link_replays += 1
    except Exception as error:
        figures.errors.append(f"links: {type(error).__name__}: {str(error)[:300]}")
