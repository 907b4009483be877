// Charts on a model page: one evaluation column across the models of its table; a search's objective per step.
(function () {
  "use strict";
  const common = { animation: false, responsive: true, maintainAspectRatio: false };

  const scores = document.getElementById("scores-data");
  if (scores) {
    const data = JSON.parse(scores.textContent);
    const select = document.getElementById("score-column");
    select.replaceChildren(...data.columns.map((column, index) => new Option(column, String(index))));
    const chart = new Chart(document.getElementById("score-chart"), {
      type: "bar",
      data: { labels: data.models.map((m) => m.label), datasets: [] },
      options: { ...common, indexAxis: "y", plugins: { legend: { display: false } } },
    });
    const show = () => {
      const index = Number(select.value);
      chart.data.datasets = [{ label: data.columns[index], data: data.models.map((m) => m.values[index]), backgroundColor: "#2563eb" }];
      chart.update();
    };
    select.addEventListener("change", show);
    show();
  }

  const search = document.getElementById("search-data");
  if (search) {
    const history = JSON.parse(search.textContent);
    new Chart(document.getElementById("search-chart"), {
      type: "line",
      data: { datasets: [
        { label: "worst task / best parent", data: history.map((h) => ({ x: h.step, y: h.worst })), borderColor: "#dc2626" },
        { label: "mean", data: history.map((h) => ({ x: h.step, y: h.mean })), borderColor: "#2563eb" },
      ] },
      options: { ...common, scales: { x: { type: "linear", title: { display: true, text: "step" } } } },
    });
  }
})();
