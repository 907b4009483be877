"""The picture of a search, drawn from its history alone; and a search's record and picture over the API, seen
exactly as the model itself is (another user's private model: 404, as for one that does not exist)."""

import os
import xml.etree.ElementTree as ET

import pytest

from merger.search.picture import search_svg
from tests.service_harness import Service
from tests.test_search import search_inputs, search_recipe  # noqa: F401 - a fixture, and the tiny search recipe
from tests.test_tenancy import finished

SVG = "{http://www.w3.org/2000/svg}"


def series(svg: str) -> dict[str, list[tuple[float, float]]]:
    """Each series in the picture by name (panel title / series name): its points as drawn."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return {f"{panel.get('data-title')} / {group.get('data-name')}":
            [(float(c.get("data-x")), float(c.get("data-y"))) for c in group.iter(f"{SVG}circle")]
            for panel in root.iter(f"{SVG}g") if panel.get("class") == "panel"
            for group in panel.iter(f"{SVG}g") if group.get("class") == "series"}


def test_the_picture_holds_every_series_of_a_hand_made_history():
    history = [{"step": 0, "objective": [0.5, 0.6, -2.0], "exact": [0.25, 1.0]},
               {"step": 5, "objective": [0.75, 0.8, -1.5], "exact": [0.75, 0.75], "pareto": True},
               {"step": 10, "objective": [1.0, 1.0, float("nan")], "exact": [1.0, 0.5], "pareto": True},
               {"step": 15, "objective": [0.5, 0.7, -1.0], "exact": [0.5, 0.5]}]
    svg = search_svg(history, ["sentiment", "json <&>"], objective_names=["worst", "mean"], title="a & b")
    drawn = series(svg)
    assert drawn["worst / worst"] == [(0, 0.5), (5, 0.75), (10, 1.0), (15, 0.5)]
    assert drawn["mean / mean"] == [(0, 0.6), (5, 0.8), (10, 1.0), (15, 0.7)]
    assert drawn["objective 3 / objective 3"] == [(0, -2.0), (5, -1.5), (15, -1.0)]  # NaN is left out
    assert drawn["exact match per task / sentiment"] == [(0, 0.25), (5, 0.75), (10, 1.0), (15, 0.5)]
    assert drawn["exact match per task / json <&>"] == [(0, 1.0), (5, 0.75), (10, 0.5), (15, 0.5)]
    front = "Pareto front: json <&> against sentiment"
    assert drawn[f"{front} / Pareto front"] == [(0.75, 0.75), (1.0, 0.5)]
    assert len(drawn[f"{front} / all"]) == 4
    assert len(drawn) == 7

    plain = series(search_svg([{k: v for k, v in e.items() if k != "pareto"} for e in history], ["a", "b"]))
    assert not any(name.startswith("Pareto") for name in plain)  # no entry on a front: no front panel
    with pytest.raises(ValueError):
        search_svg([], ["a"])


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_root, search_inputs):  # noqa: F811 - the fixture imported above
    tmp = tmp_path_factory.mktemp("search-api")
    env = {**os.environ, "MERGER_HOME": str(tmp / "home"), "MERGER_MODEL_ROOTS": str(model_root)}
    env.pop("MERGER_DATABASE_URL", None)
    env.pop("MERGER_BROKER_URL", None)
    (tmp / "logs").mkdir()
    running = Service(env, tmp / "logs")
    try:
        running.start_worker()
        yield running
    finally:
        running.stop()


def test_a_searched_models_record_and_picture_are_served_as_the_model_is(service):
    alice, bob = (service.client(service.token(user)) for user in ("alice", "bob"))
    searched = finished(alice, alice.post("/v1/jobs", json={"recipe": search_recipe(steps=4), "name": "searched"}).json()["id"])["model_id"]
    record = alice.get(f"/v1/models/{searched}/search")
    assert record.status_code == 200, record.text
    history = record.json()["history"]
    assert [e["step"] for e in history] == [0, 2, 4] and all(len(e["exact"]) == 2 and len(e["objective"]) == 3 for e in history)
    picture = alice.get(f"/v1/models/{searched[:12]}/search.svg")
    assert picture.status_code == 200 and picture.headers["content-type"].startswith("image/svg+xml")
    drawn = series(picture.text)
    assert drawn["exact match per task / task-a.jsonl"] == [(e["step"], e["exact"][0]) for e in history]

    for path in (f"/v1/models/{searched}/search", f"/v1/models/{searched}/search.svg"):
        hidden = bob.get(path)
        assert hidden.status_code == 404 and hidden.json() == {"detail": f"no model {searched}"}
    assert alice.post(f"/v1/models/{searched}/visibility", json={"public": True}).status_code == 200
    assert bob.get(f"/v1/models/{searched}/search").json() == record.json()
    assert bob.get(f"/v1/models/{searched}/search.svg").text == picture.text

    plain = finished(alice, alice.post("/v1/jobs", json={"recipe": {"merge_method": "linear", "models": [
        {"model": "llama-ft1", "parameters": {"weight": 0.5}}, {"model": "llama-ft2", "parameters": {"weight": 0.5}}]},
        "name": "plain"}).json()["id"])["model_id"]
    for path in (f"/v1/models/{plain}/search", f"/v1/models/{plain}/search.svg"):
        answer = alice.get(path)
        assert answer.status_code == 404 and "was not made by a search" in answer.json()["detail"]
