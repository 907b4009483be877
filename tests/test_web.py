"""The web pages in a real browser (Debian's chromium through Playwright) against real API and worker processes.

Each test saves screenshots of the pages it visits to MERGER_SCREENSHOTS (default: a temporary directory).
"""

import hashlib
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import expect

from merger.db import ModelRow
from merger.settings import Settings
from merger.store import Store
from tests.service_harness import Service, wait_for
from tests.test_single_user import run_locally, server_env

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is not installed; "
                                                               "scripts/setup.sh installs it")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
PERPLEXITY_TEXT = "web-words.txt"

# three mistakes: an unknown dtype, a density above 1, a model that is nowhere
BROKEN = """\
stages:
  - name: merged
    merge:
      merge_method: ties
      base_model: gemma3-base
      dtype: float99
      models:
        - model: gemma3-ft1
          parameters: {weight: 0.5, density: 1.5}
        - model: gemma3-nowhere
          parameters: {weight: 0.5, density: 0.5}
"""
BROKEN_LINES = {"dtype": 6, "density": 9, "gemma3-nowhere": 10}
FIXED = f"""\
stages:
  - name: merged
    merge:
      merge_method: ties
      base_model: gemma3-base
      dtype: float32
      models:
        - model: gemma3-ft1
          parameters: {{weight: 0.5, density: 0.5}}
        - model: gemma3-ft2
          parameters: {{weight: 0.5, density: 0.5}}
  - name: scores
    evaluate:
      models: [merged]
      perplexity: [{PERPLEXITY_TEXT}]
      window: 16
      limit: 4
"""


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    path = Path(os.environ.get("MERGER_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root):
    """One multi-user server for the module: the API and one worker process, jobs in SQLite."""
    (model_root / PERPLEXITY_TEXT).write_text(" ".join(f"w{4 + (i * 7) % 60}" for i in range(400)))
    tmp = tmp_path_factory.mktemp("web")
    (tmp / "logs").mkdir()
    svc = Service(server_env(tmp / "home", model_root), tmp / "logs")
    svc.start_worker()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


class Visit:
    """A browser context on one server that refuses every request to anywhere else and records page errors."""

    def __init__(self, browser, server: str, screenshots: Path, **context_args):
        self.server, self.screenshots = server, screenshots
        self.context = browser.new_context(accept_downloads=True, **context_args)
        self.elsewhere: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._only_the_server)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", self._console)

    def _console(self, message) -> None:
        # a CSP refusal or a script's error; an answer's 4xx status (which tests ask for) is not one
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def _only_the_server(self, route):
        if route.request.url.startswith(self.server + "/"):
            route.continue_()
        else:
            self.elsewhere.append(route.request.url)
            route.abort()

    def go(self, path: str):
        return self.page.goto(self.server + path)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=self.screenshots / f"{name}.png", full_page=True)

    def sign_in(self, token: str) -> None:
        self.go("/signin")
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(re.compile(r"/models$"))

    def close(self) -> None:
        self.context.close()
        assert self.elsewhere == [], f"the page asked for something outside the server: {self.elsewhere}"
        assert self.errors == [], f"errors in the page: {self.errors}"


@pytest.fixture
def visit(browser, server, screenshots):
    visits = []

    def open_visit(**context_args) -> Visit:
        visits.append(Visit(browser, server.url, screenshots, **context_args))
        return visits[-1]

    yield open_visit
    for v in visits:
        v.close()


def set_recipe(page, text: str) -> None:
    page.locator(".CodeMirror").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)


def problems(page) -> list[str]:
    return page.locator("#problems li").all_inner_texts()


def finished_job(client: httpx.Client, recipe: str, name: str) -> dict:
    job = client.post("/v1/jobs", json={"recipe": recipe, "name": name}).json()
    return wait_for(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["state"] in ("succeeded", "failed") and j,
                    180, f"job {name}", 0.3)


def test_recipe_with_three_mistakes_then_a_job_to_its_model_lineage_and_evaluations(visit, server, tmp_path):
    v = visit()
    v.sign_in(server.token("alice"))
    v.go("/editor")
    set_recipe(v.page, BROKEN)
    expect(v.page.locator("#problems li")).to_have_count(3)
    found = problems(v.page)
    for word, line in BROKEN_LINES.items():
        assert any(f"line {line}" in p and word in p for p in found), (word, line, found)
    assert all("stages[0].merge." in p for p in found)
    assert v.page.locator(".CodeMirror .problem-line").count() == 3
    v.shot("editor-problems")

    set_recipe(v.page, FIXED)
    v.page.wait_for_selector("#status:has-text('No problems')")
    assert problems(v.page) == []
    v.page.reload()  # the draft is kept across reloads
    v.page.wait_for_selector("#status:has-text('No problems')")
    assert v.page.evaluate("document.querySelector('.CodeMirror').CodeMirror.getValue()") == FIXED

    v.page.get_by_label("Name of its output").fill("web-ties")
    v.page.get_by_role("button", name="Submit").click()
    v.page.wait_for_url(re.compile(r"/jobs/[0-9a-f]+$"))
    v.page.wait_for_selector("#state:has-text('succeeded')", timeout=180_000)
    bars = v.page.locator("#stages progress")
    assert bars.count() == 2 and all(bars.nth(i).evaluate("b => b.value") == 1 for i in range(2))
    assert v.page.locator("#elapsed").inner_text() != "–" and not v.page.get_by_role("button", name="Cancel").is_visible()
    v.shot("job")

    v.page.locator("#model a").click()
    v.page.wait_for_selector("h1:has-text('merged')")
    merged_id = v.page.url.rsplit("/", 1)[1]
    scores = v.page.locator("#scores tbody tr")
    assert scores.count() == 4  # the base, the two donors and the merge
    assert v.page.locator("#scores tr.this td.num").first.inner_text() not in ("", "–")
    assert v.page.evaluate("Chart.getChart('score-chart').data.datasets[0].data.length") == 4
    v.shot("model")
    v.page.get_by_role("link", name="Use as a new recipe").first.click()
    v.page.wait_for_selector("#status:has-text('No problems. Stages: merged.')")
    v.page.go_back()

    weights = v.page.locator("table.files tr", has_text="model.safetensors")
    sha = weights.locator("code.sha").inner_text()
    with v.page.expect_download() as download:
        weights.get_by_role("link", name="model.safetensors").click()
    assert hashlib.sha256(Path(download.value.path()).read_bytes()).hexdigest() == sha

    v.page.get_by_role("link", name="Lineage graph").click()
    v.page.wait_for_selector("#graph-status:has-text('4 models')")
    assert set(v.page.locator("#graph-list a").all_inner_texts()) == {"merged", "gemma3-base", "gemma3-ft1", "gemma3-ft2"}
    assert v.page.locator("#graph canvas").count() > 0
    v.shot("lineage")
    v.page.get_by_label("Depth").select_option("1")
    v.page.get_by_label("Show").select_option("descendants")
    v.page.wait_for_selector("#graph-status:has-text('1 models')")
    v.page.get_by_label("Show").select_option("both")
    v.page.get_by_role("link", name="gemma3-base").click()  # the list beside the graph: each model opens
    v.page.wait_for_selector("h1:has-text('gemma3-base')")

    v.go(f"/models/{merged_id}")
    v.page.get_by_role("link", name=re.compile("^Compare with")).click()
    assert v.page.get_by_label("Second").input_value() == merged_id
    common = v.page.locator("section", has=v.page.locator("h2", has_text="Common ancestors"))
    parent = v.page.get_by_label("First").locator("option:checked").inner_text().split(" ")[0]
    assert common.get_by_role("link").all_inner_texts() == [parent]  # the parent is the one model both descend from
    assert v.page.locator("pre.diff .add").count() > 0  # the base has no recipe: every line of the merge's is new
    v.shot("compare")

    v.go("/models")  # the filters apply as you choose and type (htmx)
    names = v.page.locator("#models tbody td:first-child a")
    v.page.get_by_label("Relation").select_option("merge")
    expect(names).to_have_text(["merged"])
    v.page.get_by_label("Relation").select_option("")
    v.page.get_by_label("Name").fill("ft")
    expect(names).to_have_count(2)
    assert set(names.all_inner_texts()) == {"gemma3-ft1", "gemma3-ft2"}
    assert v.page.url.endswith("/models?relation=&name=ft")


def linear(weight: float, first: str = "gemma3-ft1") -> str:
    return yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": first, "parameters": {"weight": weight}}, {"model": "gemma3-ft2", "parameters": {"weight": 1 - weight}}]})


def test_jobs_cancel_errors_and_a_job_page_across_a_restart_of_the_server(visit, server, model_root):
    """Jobs outlive the page's connection: queued with no worker, the API restarted, then a worker runs them."""
    token = server.token("erin")
    for worker in list(server.workers):
        server.stop_worker(worker)
    client = server.client(token)
    doomed = model_root / "web-doomed"  # valid at submission, gone when the job runs
    shutil.copytree(model_root / "gemma3-ft1", doomed)
    kept, cancelled, failing = (client.post("/v1/jobs", json={"recipe": linear(w, first), "name": name}).json()
                                for w, first, name in ((0.7, "gemma3-ft1", "restarted"), (0.1, "gemma3-ft1", "cancelled"),
                                                       (0.5, "web-doomed", "doomed")))
    shutil.rmtree(doomed)
    v = visit()
    v.sign_in(token)
    v.go("/jobs")
    assert v.page.locator("#jobs tbody tr .state").all_inner_texts() == ["queued"] * 3

    v.go(f"/jobs/{cancelled['id']}")
    v.page.get_by_role("button", name="Cancel").click()
    v.page.wait_for_selector("#state:has-text('cancelled')")

    v.go(f"/jobs/{kept['id']}")
    v.page.wait_for_selector("#live:has-text('live')")
    assert v.page.locator("#state").inner_text() == "queued"
    server.stop_api()
    v.page.wait_for_selector("#live:has-text('reconnecting')")
    server.start_api()
    server.start_worker()
    v.page.wait_for_selector("#state:has-text('succeeded')", timeout=180_000)
    assert v.page.locator("#model a").count() == 1

    v.go(f"/jobs/{failing['id']}")
    v.page.wait_for_selector("#state:has-text('failed')", timeout=180_000)
    assert "web-doomed" in v.page.get_by_role("alert").inner_text()  # the error, in full
    v.shot("job-failed")
    v.go("/jobs")
    expect(v.page.locator("#jobs tbody tr .state")).to_have_text(["failed", "cancelled", "succeeded"])
    v.shot("jobs")


def test_sign_in_cookie_and_privacy(visit, server):
    bob = server.client(server.token("bob"))
    private = finished_job(bob, linear(0.2), "bobs")
    assert private["state"] == "succeeded"

    v = visit()
    v.go("/models")
    assert v.page.url.endswith("/signin?next=/models")
    v.shot("signin")
    v.page.get_by_label("API token").fill("mrg_not-a-token")
    v.page.get_by_role("button", name="Sign in").click()
    assert v.page.get_by_role("alert").inner_text() == "That token is not valid."

    alice = server.token("alice")
    v.sign_in(alice)
    cookie = next(c for c in v.context.cookies() if c["name"] == "merger_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == alice
    assert "merger_token" not in v.page.evaluate("document.cookie")
    assert v.go(f"/models/{private['model_id']}").status == 404  # bob's model is not reachable by URL
    assert v.page.get_by_role("alert").inner_text() == f"no model {private['model_id']}"
    assert v.go(f"/v1/models/{private['model_id']}/files/config.json").status == 404
    v.go("/models?name=bobs")
    assert v.page.locator("#models tbody").inner_text().startswith("No models match")
    v.shot("models")

    v.go("/models")
    v.page.get_by_role("button", name="Sign out").click()
    v.page.wait_for_url(re.compile(r"/signin$"))
    assert not [c for c in v.context.cookies() if c["name"] == "merger_token"]
    v.go("/jobs")
    assert "/signin" in v.page.url


def test_a_signed_in_cookie_changes_nothing_from_another_site(server):
    token = server.token("carol")
    for origin, refused in (("http://evil.example", True), (None, True), (server.url, False)):
        headers = {"cookie": f"merger_token={token}"} | ({"origin": origin} if origin else {})
        answer = httpx.post(f"{server.url}/v1/jobs", headers=headers, json={"recipe": "merge_method: nope"})
        assert (answer.status_code == 403) == refused, (origin, answer.text)
    assert httpx.get(f"{server.url}/v1/jobs", headers={"cookie": f"merger_token={token}"}).status_code == 200
    stranger = httpx.post(f"{server.url}/signin", data={"token": token}, headers={"origin": "http://evil.example"})
    assert stranger.status_code == 403 and "set-cookie" not in stranger.headers


def test_phone_sized_screen_and_keyboard(visit, server):
    v = visit(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    v.sign_in(server.token("dave"))
    for path in ("/models", "/editor", "/jobs", "/compare"):
        v.go(path)
        assert v.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        unlabelled = v.page.evaluate("""[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
            .filter(e => e.offsetParent !== null && !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id || e.name)""")
        assert unlabelled == [], (path, unlabelled)
    v.go("/editor?example=gemma-linear")  # a shipped example names Gemma 3 270M, which this store lacks
    v.page.wait_for_selector("#status:has-text('problem')")
    assert v.page.locator("#problems li").count() > 0
    v.shot("editor-phone")
    v.go("/models")
    v.page.keyboard.press("Tab")
    assert v.page.evaluate("document.activeElement.textContent") == "Skip to content"
    v.page.keyboard.press("Tab")
    v.page.keyboard.press("Tab")
    assert v.page.evaluate("document.activeElement.textContent") == "Models"


def test_single_user_mode_shows_a_model_made_by_merger_run(browser, model_root, screenshots, tmp_path):
    env = server_env(tmp_path / "home", model_root, MERGER_SINGLE_USER="true")
    made = run_locally(env, tmp_path / "local-merge.yaml", 0.4)
    with Store(Settings(home=tmp_path / "home")).session.begin() as s:  # as a search stage records its trials
        s.get(ModelRow, made).origin = {"search": {"history": [
            {"step": step, "loss": None, "objective": [0.5 + step / 100, 0.6 + step / 100, -2.0]} for step in (0, 10, 20)]}}
    (tmp_path / "logs").mkdir()
    local = Service(env, tmp_path / "logs")
    v = Visit(browser, local.url, screenshots)
    try:
        v.go("/models")
        v.page.get_by_role("link", name="local-merge").click()
        v.page.wait_for_url(re.compile(made))
        assert v.page.get_by_role("button", name="Make public").is_visible()  # the local user owns it
        assert f"hf download local/local-merge --revision {made[:40]}" in v.page.locator("pre.snippet").first.inner_text()
        assert v.page.evaluate("Chart.getChart('search-chart').data.datasets.map(d => d.data.map(p => p.y))") == [
            [0.5 + step / 100 for step in (0, 10, 20)], [0.6 + step / 100 for step in (0, 10, 20)]]
        v.shot("model-single-user")
        v.page.get_by_role("button", name="Make public").click()
        v.page.wait_for_selector("#visibility:has-text('public')")
    finally:
        v.close()
        local.stop()
