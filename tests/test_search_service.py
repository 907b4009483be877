"""A black-box search as a service job: a real worker runs it, reports each trial, stops on cancel with no model,
and a resubmission resumes the study (the embedded broker; Redis runs the same code)."""

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.test_search import search_inputs  # noqa: F401 - a fixture
from tests.test_search_blackbox import blackbox_recipe
from tests.test_service import finished, stored_dirs
from tests.service_harness import wait_for

TRIALS = 40  # enough that a cancel (seen within a second, between trials) lands before the last one


def finished_trials(service) -> int:
    from pathlib import Path

    url = f"sqlite:///{Path(service.env['MERGER_HOME']) / 'search.db'}"
    storage = optuna.storages.RDBStorage(url)
    [summary] = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


@pytest.mark.parametrize("service", ["embedded"], indirect=True)
def test_a_search_job_reports_trials_cancels_and_resumes(service, search_inputs):
    service.start_worker()
    client = service.client(service.token("erin"))
    recipe = yaml.safe_dump(blackbox_recipe(trials=TRIALS))
    job_id = client.post("/v1/jobs", json={"recipe": recipe, "name": "search-job"}).json()["id"]
    job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and j["done"] >= 2 and j, 300,
                   "two trials", 0.1)
    assert job["stage"] == "searched" and job["total"] == TRIALS and job["done"] < TRIALS

    client.post(f"/v1/jobs/{job_id}/cancel")
    job = finished(client, job_id)
    assert job["state"] == "cancelled" and job["model_id"] is None
    assert stored_dirs(service) == [] and client.get("/v1/models").json() == []
    stopped_at = finished_trials(service)
    assert 2 <= stopped_at < TRIALS

    again = client.post("/v1/jobs", json={"recipe": recipe, "name": "search-job"}).json()
    job = finished(client, again["id"], 300)
    assert job["state"] == "succeeded", job
    record = client.get(f"/v1/models/{job['model_id']}").json()["origin"]["search"]
    assert record["trials"] == TRIALS == finished_trials(service) and record["trials_this_run"] == TRIALS - stopped_at
