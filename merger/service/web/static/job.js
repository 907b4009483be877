// A job page: live state from the API's server-sent events (reconnecting), a progress bar per stage, elapsed time.
(function () {
  "use strict";
  const FINAL = ["succeeded", "failed", "cancelled"];
  const root = document.getElementById("job");
  const jobId = root.dataset.id;
  const live = document.getElementById("live");
  const elapsed = document.getElementById("elapsed");
  const stageList = document.getElementById("stages");
  let job = JSON.parse(document.getElementById("job-data").textContent);

  function stageItem(name) {
    let item = [...stageList.children].find((li) => li.dataset.stage === name);
    if (!item) { // a stage the page did not know of: shown as it runs
      item = document.createElement("li");
      item.dataset.stage = name;
      const label = document.createElement("span");
      label.className = "stage-name";
      label.textContent = name;
      const bar = document.createElement("progress");
      bar.max = 1;
      bar.value = 0;
      bar.setAttribute("aria-label", `progress of stage ${name}`);
      const count = document.createElement("span");
      count.className = "count";
      item.append(label, bar, count);
      stageList.append(item);
    }
    return item;
  }

  function render() {
    const state = document.getElementById("state");
    state.textContent = job.state;
    state.className = `state ${job.state}`;
    document.getElementById("attempts").textContent = job.attempts;
    if (job.model_id) {
      const link = document.createElement("a");
      link.href = `/models/${job.model_id}`;
      link.textContent = job.model_id.slice(0, 12);
      document.getElementById("model").replaceChildren(link);
    }
    const error = document.getElementById("error");
    error.hidden = !job.error;
    if (job.error) {
      document.getElementById("error-code").textContent = job.error.code;
      document.getElementById("error-message").textContent = job.error.message;
    }
    document.getElementById("cancel").hidden = FINAL.includes(job.state);
    elapsed.dataset.started = job.started_at || "";
    elapsed.dataset.finished = job.finished_at || "";
    const current = job.stage ? stageItem(job.stage) : null;
    const items = [...stageList.children];
    const at = current ? items.indexOf(current) : -1;
    items.forEach((item, index) => {
      const bar = item.querySelector("progress");
      const count = item.querySelector(".count");
      if (job.state === "succeeded" || index < at) {
        bar.value = 1;
        count.textContent = "done";
      } else if (index === at) {
        if (job.total) { bar.value = job.done / job.total; count.textContent = `${job.done}/${job.total}`; }
        else { bar.removeAttribute("value"); count.textContent = job.state === "running" ? "started" : ""; }
        if (FINAL.includes(job.state)) { bar.value = job.total ? job.done / job.total : 0; count.textContent += ` (${job.state})`; }
      } else {
        bar.value = 0;
        count.textContent = "";
      }
    });
    tick();
  }

  function clock(seconds) {
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return `${h ? h + ":" + String(m).padStart(2, "0") : m}:${String(s % 60).padStart(2, "0")}`;
  }

  function tick() {
    const started = Date.parse(elapsed.dataset.started);
    if (Number.isNaN(started)) {
      elapsed.textContent = `waiting in the queue for ${clock((Date.now() - Date.parse(job.created_at)) / 1000)}`;
      return;
    }
    const finished = Date.parse(elapsed.dataset.finished);
    elapsed.textContent = clock(((Number.isNaN(finished) ? Date.now() : finished) - started) / 1000);
  }

  function connect() {
    const source = new EventSource(`/v1/jobs/${jobId}/events`);
    source.addEventListener("job", (event) => {
      live.textContent = "live";
      job = JSON.parse(event.data);
      render();
      if (FINAL.includes(job.state)) { source.close(); live.textContent = ""; }
    });
    source.onerror = () => {
      if (FINAL.includes(job.state)) return;
      live.textContent = "reconnecting…";
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000); // the browser gave up: start again
    };
  }

  render();
  setInterval(tick, 1000);
  if (!FINAL.includes(job.state)) connect();
})();
