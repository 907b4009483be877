"""Hostile requests against a live `merger serve` (one process for the module): each gets a 4xx, never a 500 or a
dropped connection, and the server's log holds no traceback afterwards. Also the CLI on hostile recipe files."""

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, unquote

import httpx
import psutil
import pytest
import yaml

from merger.errors import RecipeError
from merger.orchestrator import check_recipe, run_recipe
from merger.safe_yaml import MAX_DEPTH, load_recipe_file
from merger.access import grant
from merger.service.auth import create_token
from merger.settings import Settings
from merger.store import Store
from tests.service_harness import BIN, Service

UNICODE_NAME = "ünï-名前"  # neither ASCII nor Latin-1
LINEAR = {"merge_method": "linear", "models": [{"model": "llama-ft1", "parameters": {"weight": 0.5}},
                                               {"model": "llama-ft2", "parameters": {"weight": 0.5}}]}


def start_world(tmp: Path, model_root: Path) -> tuple[Service, SimpleNamespace]:
    """A live API (no workers) where alice owns `tiny-linear` (built here, then a succeeded job of hers, served from the cache) and a
    registered model named UNICODE_NAME; bob has a token and nothing else."""
    settings = Settings(home=tmp / "home", model_roots=[model_root], database_url=None)
    store = Store(settings)
    [built] = run_recipe(check_recipe(LINEAR, settings, store, default_name="tiny-linear"), settings, store)
    with store.session.begin() as s:
        tokens = {user: create_token(s, user) for user in ("alice", "bob")}
        grant(s, [built.model.id], "alice", owner=True)  # her job below is a cache hit, which grants reading only
    env = {**os.environ, "MERGER_HOME": str(settings.home), "MERGER_MODEL_ROOTS": str(model_root)}
    env.pop("MERGER_DATABASE_URL", None)
    env.pop("MERGER_BROKER_URL", None)
    (tmp / "logs").mkdir()
    service = Service(env, tmp / "logs")
    try:
        alice = service.client(tokens["alice"])
        job = alice.post("/v1/jobs", json={"recipe": LINEAR, "name": "tiny-linear"})
        assert job.status_code == 200 and job.json()["state"] == "succeeded", job.text
        registered = alice.post("/v1/models", json={"source": "llama-base", "name": UNICODE_NAME})
        assert registered.status_code == 201, registered.text
    except BaseException:
        service.stop()
        raise
    world = SimpleNamespace(url=service.url, tokens=tokens, job=job.json(), model=job.json()["model_id"],
                            unicode_model=registered.json()["id"], log=tmp / "logs" / "api-0.log", pid=service.api.pid)
    return service, world


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_root):
    service, world = start_world(tmp_path_factory.mktemp("hostile"), model_root)
    yield world
    service.stop()


@pytest.fixture(autouse=True)
def no_traceback_in_the_log(request):
    """Every test here also asserts that the server logged no traceback while it ran."""
    if "world" not in request.fixturenames:
        yield
        return
    world = request.getfixturevalue("world")
    start = world.log.stat().st_size
    yield
    with open(world.log, "rb") as log:
        log.seek(start)
        logged = log.read().decode(errors="replace")
    assert "Traceback" not in logged and "Exception in ASGI application" not in logged, logged[-3000:]


@pytest.fixture
def alice(world):
    with httpx.Client(base_url=world.url, headers={"authorization": f"Bearer {world.tokens['alice']}"}, timeout=60) as client:
        yield client


def send(world, method: str, target: str, *, token: str | None = None, **kwargs) -> httpx.Response:
    """One request on a fresh connection (a refused request may close its connection)."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, world.url + target, headers={**headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs)


def json_body(world, target: str, raw: bytes, token: str | None = None) -> httpx.Response:
    return send(world, "POST", target, token=token, content=raw, headers={"content-type": "application/json"})


# --- bodies ---------------------------------------------------------------------------------------------------

BIG = 200 * 1024 * 1024


def _streamed(sent: list[int]):
    """A 200 MB JSON body, chunked (no Content-Length); ``sent`` counts what the client managed to hand over."""
    yield b'{"recipe": "'
    chunk = b"a" * (1 << 20)
    for _ in range(BIG // len(chunk)):
        sent[0] += len(chunk)
        yield chunk
    yield b'"}'


@pytest.mark.parametrize("with_token", [False, True])
def test_a_200_mb_body_is_refused_with_413_before_it_is_read(world, with_token):
    token = world.tokens["alice"] if with_token else None
    server = psutil.Process(world.pid)
    rss_before = server.memory_info().rss

    sized = json_body(world, "/v1/jobs", b'{"recipe": "' + b"a" * BIG + b'"}', token)
    sent = [0]
    streamed = send(world, "POST", "/v1/recipes/validate", token=token, content=_streamed(sent),
                    headers={"content-type": "application/json"})

    for refused in (sized, streamed):
        assert refused.status_code == 413, refused.text
        assert "1048576-byte limit (MERGER_MAX_BODY_BYTES)" in refused.json()["detail"]
    # the chunked upload stopped once the server answered: far less than 200 MB went out (socket buffers aside)
    assert sent[0] < BIG / 4
    assert server.memory_info().rss - rss_before < 64 * 1024 * 1024


def test_a_body_under_the_cap_is_read_as_before(alice):
    padded = yaml.safe_dump(LINEAR) + "#" * 250_000  # a 250 kB body, streamed in many chunks, under both caps
    assert alice.post("/v1/recipes/validate", json={"recipe": padded}).status_code == 200


def deep_json(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


@pytest.mark.parametrize("raw", [
    json.dumps({"recipe": deep_json(MAX_DEPTH)}).encode(),  # one level over, counting the body's own mapping
    b'{"recipe": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deeper than Python's recursion limit
], ids=["just-over", "100000-levels"])
def test_deeply_nested_json_is_refused_naming_the_limit(world, raw):
    for token in (world.tokens["alice"], None):
        refused = json_body(world, "/v1/recipes/validate", raw, token)
        assert refused.status_code == 422
        assert refused.json() == {"detail": f"the JSON body nests mappings and lists deeper than {MAX_DEPTH} levels (the limit)"}


def test_nesting_up_to_the_limit_is_the_recipes_business(alice):
    answer = alice.post("/v1/recipes/validate", json={"recipe": deep_json(MAX_DEPTH - 1)})
    assert answer.status_code == 422 and answer.json()["ok"] is False  # a recipe problem, not a refused request


def test_deeply_nested_yaml_is_a_recipe_problem_naming_the_limit(alice):
    flow = "[" * 400 + "]" * 400  # 800 bytes: a RecursionError (500) before the depth cap
    block = "".join("  " * i + "k:\n" for i in range(400))
    for text in (flow, block):
        answer = alice.post("/v1/recipes/validate", json={"recipe": text})
        assert answer.status_code == 422
        [problem] = answer.json()["problems"]
        assert problem["loc"] == "recipe"
        assert f"nests mappings and lists deeper than {MAX_DEPTH} levels (the limit)" in problem["msg"]


@pytest.mark.parametrize(("raw", "status", "detail"), [
    (b'{"recipe": "\\ud800"}', 422, "lone surrogate"),
    (b'{"recipe": {"\\udfff": 1}, "name": "x"}', 422, "lone surrogate"),
    (b'{"recipe": {"a": NaN}}', 422, "holds NaN, which is not JSON"),
    (b'{"recipe": {"a": -Infinity}}', 422, "holds -Infinity, which is not JSON"),
    (b'{"recipe": {"a": 1e999}}', 422, "holds a number beyond the range of a float (1e999)"),
    (b'{"recipe": "\xff\xfe"}', 400, "the request body is not UTF-8 (byte 0xff at offset 12)"),
], ids=["surrogate", "surrogate-key", "nan", "infinity", "overflow", "not-utf8"])
def test_json_no_route_could_answer_is_refused(world, raw, status, detail):
    for target in ("/v1/recipes/validate", "/v1/jobs", "/v1/models"):
        refused = json_body(world, target, raw, world.tokens["alice"])
        assert refused.status_code == status and detail in refused.json()["detail"], refused.text


def test_a_surrogate_pair_is_unicode_text(alice):
    answer = alice.post("/v1/recipes/validate", content=b'{"recipe": {"merge_method": "\\ud83d\\ude00"}}',
                        headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["ok"] is False  # reached the recipe checks


@pytest.mark.parametrize(("content_type", "raw"), [
    ("text/plain", b"\xff\xfe\x00"),  # FastAPI's 422 echoed these bytes back and failed to encode them
    ("application/json", b'{"recipe": '),
    ("application/octet-stream", b"merge_method: linear"),
])
def test_bodies_that_do_not_fit_get_a_field_error(world, content_type, raw):
    answer = send(world, "POST", "/v1/jobs", token=world.tokens["alice"], content=raw, headers={"content-type": content_type})
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"][0] == "body" and error["msg"] and "input" not in error


def test_control_characters_in_a_recipe_are_a_recipe_problem(alice):
    answer = alice.post("/v1/recipes/validate", json={"recipe": "merge_method: lin\x01ear"})
    assert answer.status_code == 422 and "special characters are not allowed" in answer.json()["problems"][0]["msg"]


# --- paths ----------------------------------------------------------------------------------------------------

ROUTES = ["/v1/jobs/{x}", "/v1/jobs/{x}/events", "/v1/models/{x}", "/v1/models/{x}/lineage", "/v1/models/{x}/evals",
          "/v1/models/{x}/files/{x}", "/v1/models/{x}/archive", "/api/models/{x}/{x}", "/api/models/alice/{x}/revision/{x}",
          "/api/models/alice/tiny-linear/tree/main/{x}", "/alice/tiny-linear/resolve/main/{x}", "/{x}/{x}/resolve/main/x"]
ODD = {"unicode": UNICODE_NAME, "control": "a\nb\r\x01\x1b[31m", "quote": 'a"b\\', "hex-5000": "ab" * 2500,
       "text-5000": "x" * 5000, "slashes": "a/" * 2000}


@pytest.mark.parametrize("value", ODD.values(), ids=ODD.keys())
def test_any_unicode_control_character_or_long_value_in_a_path_is_a_4xx(world, value):
    for token in (world.tokens["bob"], None):
        for route in ROUTES:
            for method in ("GET", "HEAD") if "/files/" in route or "/resolve/" in route else ("GET",):
                target = route.replace("{x}", quote(value, safe="/" if "/files/" in route or "/resolve/" in route else ""))
                answer = send(world, method, target, token=token)
                assert answer.status_code in (400, 401, 404), (method, target[:100], answer.status_code, answer.text[:300])
                if method == "GET":
                    assert "detail" in answer.json()


def test_an_overlong_request_target_is_414(world):
    for target in ("/v1/models/" + "a" * 20_000, "/v1/models?x=" + "a" * 20_000, "/alice/tiny-linear/resolve/main/" + "p/" * 10_000):
        answer = send(world, "GET", target, token=world.tokens["alice"])
        assert answer.status_code == 414 and "16384-byte limit" in answer.json()["detail"]


def test_a_nul_in_the_url_is_400(world):
    for target in ("/v1/models/%00", "/api/models/alice/tiny%00linear", f"/v1/models/{'0' * 8}/lineage?to=%00"):
        answer = send(world, "GET", target, token=world.tokens["alice"])
        assert answer.status_code == 400 and answer.json() == {"detail": "the URL holds a NUL character"}


# --- Hub errors and archive names: headers stay Latin-1 ----------------------------------------------------------


def hub_error(answer: httpx.Response) -> tuple[int, str, str]:
    return answer.status_code, answer.headers["x-error-code"], answer.headers["x-error-message"]


def test_hub_errors_escape_newlines_and_non_latin1_names(world):
    bob, alice = world.tokens["bob"], world.tokens["alice"]
    name = quote(UNICODE_NAME)
    assert hub_error(send(world, "GET", "/api/models/a%0ab/x", token=bob)) == (404, "RepoNotFound", r"Repository a\nb/x not found")
    assert hub_error(send(world, "GET", "/api/models/a%0ab/x")) == (401, "RepoNotFound", r"Repository a\nb/x not found")
    assert hub_error(send(world, "HEAD", f"/a%0d%0aSet-Cookie:%20x=1/{name}/resolve/main/x")) == (
        401, "RepoNotFound", rf"Repository a\r\nSet-Cookie: x=1/{UNICODE_NAME.encode('unicode_escape').decode()} not found")
    escaped = r"alice/\xfcn\xef-\u540d\u524d"
    assert hub_error(send(world, "GET", f"/api/models/alice/{name}/revision/{'0' * 40}", token=alice)) == (
        404, "RevisionNotFound", f"Revision {'0' * 40} not found in {escaped}")
    missing = send(world, "GET", f"/alice/{name}/resolve/main/{quote('名.json')}", token=alice)
    assert hub_error(missing) == (404, "EntryNotFound", rf"No file \u540d.json in {escaped}")
    assert missing.headers["x-repo-commit"] == world.unicode_model[:40]
    assert missing.json() == {"detail": f"No file 名.json in alice/{UNICODE_NAME}"}
    # the name itself is served: model info and files under the Unicode repository name
    info = send(world, "GET", f"/api/models/alice/{name}", token=alice)
    assert info.status_code == 200 and info.json()["id"] == f"alice/{UNICODE_NAME}"
    assert send(world, "GET", f"/alice/{name}/resolve/main/config.json", token=alice).status_code == 200


def test_a_long_hub_error_message_is_cut(world):
    answer = send(world, "GET", "/api/models/" + quote("名" * 1500) + "/x", token=world.tokens["bob"])
    assert answer.status_code == 404 and len(answer.headers["x-error-message"]) == 1024
    assert answer.headers["x-error-message"].endswith("...")


def test_an_archive_of_a_unicode_name_has_an_rfc5987_file_name(alice, world):
    answer = alice.get(f"/v1/models/{world.unicode_model}/archive")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-tar"
    disposition = answer.headers["content-disposition"]
    plain, _, exact = disposition.partition("; filename*=UTF-8''")
    assert plain == 'attachment; filename="_n_-__.tar"' and unquote(exact) == f"{UNICODE_NAME}.tar"
    assert alice.get(f"/v1/models/{world.model}/archive").headers["content-disposition"] == 'attachment; filename="tiny-linear.tar"'


# --- time stamps ---------------------------------------------------------------------------------------------------


def test_time_stamps_carry_the_utc_zone(alice, world):
    job = alice.get(f"/v1/jobs/{world.job['id']}").json()
    model = alice.get(f"/v1/models/{world.model}").json()
    for stamp in (job["created_at"], job["finished_at"], model["created_at"]):
        assert stamp.endswith("Z"), stamp


# --- the CLI on hostile recipe files ---------------------------------------------------------------------------------


def test_the_cli_reports_a_1000_level_recipe_without_a_traceback(tmp_path, model_root):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("- " * 1000 + "x\n")  # 1,000 nested lists in 2 kB
    env = {**os.environ, "MERGER_HOME": str(tmp_path / "home"), "MERGER_MODEL_ROOTS": str(model_root)}
    done = subprocess.run([str(BIN / "merger"), "validate", str(recipe)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and f"deeper than {MAX_DEPTH} levels (the limit)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_recipe_file_that_is_not_utf8_is_a_problem(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"merge_method: linear\nmodels: [{model: caf\xe9}]\n")
    with pytest.raises(RecipeError) as refused:
        load_recipe_file(recipe, max_bytes=1024)
    assert [str(p) for p in refused.value.problems] == [f"{recipe}: not UTF-8 text (byte 0xe9 at offset 41)"]
