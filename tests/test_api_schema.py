"""The OpenAPI document tells the truth: schemathesis sends generated requests, valid and invalid, to every operation
of a live `merger serve` (the Hub-protocol routes included) with a valid token, and checks that none is a server
error and that every answer's status code, content type, headers and body are the ones the document describes.
Generated ids rarely exist, so the answers a real model and job give are checked too."""

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_hostile_requests import UNICODE_NAME, start_world

EXAMPLES = 6  # per operation and generation mode (valid, invalid): about 260 requests in all
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory, model_root):
    service, world = start_world(tmp_path_factory.mktemp("schema"), model_root)
    yield world
    service.stop()


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def auth(world, user: str = "alice") -> dict[str, str]:
    return {"authorization": f"Bearer {world.tokens[user]}"}


def test_every_operation_answers_as_documented(api_schema, live):
    failures, sent = {}, []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 23  # 17 /v1 operations and 6 of the Hub protocol (GET and HEAD apart)
    for operation in operations:
        for mode in GenerationMode:
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def answers_as_documented(case):
                sent.append(case.call_and_validate(headers=auth(live), checks=CHECKS, timeout=60).status_code)

            try:
                answers_as_documented()
            except Unsatisfiable:  # no invalid request exists: every string is a valid path parameter
                assert mode == GenerationMode.NEGATIVE
            except Exception as exc:  # noqa: BLE001 - gather every operation's failure, then report them all
                failures[f"{mode} {operation.label}"] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}: {failure}" for label, failure in failures.items())
    assert len(sent) > len(operations) * EXAMPLES and 200 in sent and 422 in sent


def test_real_models_and_jobs_answer_as_documented(api_schema, live):
    """What random ids never reach: a model's files (whole, a range, a range outside it, a malformed range), its
    archive, lineage in each format, a finished job's events, the Hub routes of a real repository; and the limits."""
    model, job, name = live.model, live.job["id"], "tiny-linear"
    calls = [
        ("/v1/models/{model_id}", "GET", {"model_id": model}, {}, {}),
        ("/v1/models/{model_id}/evals", "GET", {"model_id": model}, {}, {}),
        *[(f"/v1/models/{{model_id}}/{route}", "GET", {"model_id": model}, {}, {}) for route in ("search", "search.svg")],  # no search made it: 404
        ("/v1/models/{model_id}/archive", "GET", {"model_id": live.unicode_model}, {}, {}),
        *[("/v1/models/{model_id}/lineage", "GET", {"model_id": model}, {"format": fmt}, {}) for fmt in ("json", "mermaid", "dot")],
        ("/v1/models/{model_id}/lineage", "GET", {"model_id": model}, {"direction": "descendants", "to": model}, {}),
        *[("/v1/models/{model_id}/files/{path}", method, {"model_id": model, "path": "config.json"}, {}, {"range": byte_range})
          for method in ("GET", "HEAD") for byte_range in ("bytes=0-9", "bytes=99999-", "pages=1")],
        ("/v1/models/{model_id}/files/{path}", "GET", {"model_id": model, "path": "config.json"}, {}, {}),
        ("/v1/models/{model_id}/visibility", "POST", {"model_id": model}, {}, {}),
        ("/v1/jobs/{job_id}", "GET", {"job_id": job}, {}, {}),
        ("/v1/jobs/{job_id}/events", "GET", {"job_id": job}, {}, {}),
        ("/v1/jobs/{job_id}/cancel", "POST", {"job_id": job}, {}, {}),
        ("/api/models/{owner}/{name}", "GET", {"owner": "alice", "name": UNICODE_NAME}, {}, {}),
        ("/api/models/{owner}/{name}/revision/{revision}", "GET", {"owner": "alice", "name": name, "revision": model[:40]}, {}, {}),
        ("/api/models/{owner}/{name}/tree/{revision}", "GET", {"owner": "alice", "name": name, "revision": "main"}, {"recursive": True}, {}),
        ("/api/models/{owner}/{name}/tree/{revision}/{path}", "GET", {"owner": "alice", "name": name, "revision": "main", "path": "x"}, {}, {}),
        *[("/{owner}/{name}/resolve/{revision}/{path}", method, {"owner": "alice", "name": name, "revision": "main", "path": path}, {}, {})
          for method in ("GET", "HEAD") for path in ("config.json", "missing.json")],
    ]
    statuses = set()
    for path, method, path_parameters, query, headers in calls:
        body = {"public": False} if path.endswith("/visibility") else schemathesis.core.NOT_SET
        case = api_schema[path][method].Case(path_parameters=path_parameters, query=query, headers=headers, body=body)
        response = case.call_and_validate(headers=auth(live), checks=CHECKS, timeout=60)
        statuses.add(response.status_code)
    assert statuses == {200, 206, 400, 404, 416, 422}

    validate = api_schema["/v1/recipes/validate"]["POST"]
    for body, status in (({"recipe": "a: " + "x" * 2_000_000}, 413), ({"recipe": "- " * 100}, 422), ({"recipe": {}}, 422)):
        response = validate.Case(body=body).call_and_validate(headers=auth(live), checks=CHECKS, timeout=60)
        assert response.status_code == status
    too_long = api_schema["/v1/models/{model_id}"]["GET"].Case(path_parameters={"model_id": "a" * 20_000})
    assert too_long.call_and_validate(headers=auth(live), checks=CHECKS, timeout=60).status_code == 414
    for token in ({}, auth(live, "bob")):  # no token: 401; bob may not see alice's private model: 404
        hidden = api_schema["/v1/models/{model_id}"]["GET"].Case(path_parameters={"model_id": model})
        assert hidden.call_and_validate(headers=token, checks=CHECKS, timeout=60).status_code == (404 if token else 401)
