// The recipe editor: CodeMirror (YAML), a draft kept in localStorage, every problem shown as you type, submit → job page.
(function () {
  "use strict";
  const DRAFT = "merger.recipe-draft";
  const form = document.getElementById("editor-form");
  const nameInput = document.getElementById("recipe-name");
  const statusLine = document.getElementById("status");
  const problemList = document.getElementById("problems");
  const exampleSelect = document.getElementById("example");
  const editor = CodeMirror.fromTextArea(document.getElementById("recipe"), {
    mode: "yaml", lineNumbers: true, indentUnit: 2, tabSize: 2, screenReaderLabel: "Recipe (YAML)",
    extraKeys: {
      Tab: (cm) => cm.replaceSelection("  "),
      Esc: () => nameInput.focus(), // leave the editor by keyboard (Tab indents inside it)
    },
  });
  let timer = null;
  let sequence = 0;
  let marked = [];

  if (form.dataset.initial !== "given") {
    editor.setValue(localStorage.getItem(DRAFT) || "");
  }
  editor.on("change", () => {
    localStorage.setItem(DRAFT, editor.getValue());
    clearTimeout(timer);
    timer = setTimeout(check, 400);
    statusLine.textContent = "Checking…";
  });
  nameInput.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 400); });
  exampleSelect.addEventListener("change", async () => {
    const name = exampleSelect.value;
    if (!name) { editor.setValue(localStorage.getItem(DRAFT) || ""); return; }
    const response = await fetch(`/editor/examples/${encodeURIComponent(name)}`);
    if (response.ok) {
      editor.setValue(await response.text());
      nameInput.value = name;
    }
  });

  function postJson(url, body) {
    return fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  }

  async function check() {
    const mine = ++sequence;
    if (!editor.getValue().trim()) { show({ ok: false, problems: [] }, "Write a recipe, or start from an example."); return; }
    let response;
    try {
      response = await postJson("/editor/check", { recipe: editor.getValue(), name: nameInput.value || "recipe" });
    } catch (error) {
      statusLine.textContent = `Could not check: ${error}`;
      return;
    }
    if (mine !== sequence) return; // a newer check is under way
    if (!response.ok) {
      statusLine.textContent = `Could not check: ${await errorText(response)}`;
      return;
    }
    show(await response.json());
  }

  function show(result, message) {
    marked.forEach((line) => editor.removeLineClass(line, "background", "problem-line"));
    marked = [];
    problemList.replaceChildren();
    if (result.ok) {
      statusLine.textContent = `No problems. Stages: ${result.stages.join(", ")}.`;
      return;
    }
    statusLine.textContent = message || `${result.problems.length} problem${result.problems.length === 1 ? "" : "s"}:`;
    for (const problem of result.problems) {
      const item = document.createElement("li");
      const jump = document.createElement("button");
      jump.type = "button";
      jump.className = "link";
      jump.textContent = `line ${problem.line}`;
      jump.addEventListener("click", () => { editor.focus(); editor.setCursor({ line: problem.line - 1, ch: 0 }); });
      const where = document.createElement("code");
      where.textContent = problem.loc || "recipe";
      item.append(jump, " ", where, `: ${problem.msg}`);
      problemList.append(item);
      const line = editor.getLineHandle(problem.line - 1);
      if (line) { editor.addLineClass(line, "background", "problem-line"); marked.push(line); }
    }
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    } catch (_) {
      return `HTTP ${response.status}`;
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    statusLine.textContent = "Submitting…";
    const response = await postJson("/v1/jobs", {
      recipe: editor.getValue(), name: nameInput.value || "recipe", force: document.getElementById("force").checked,
    });
    if (response.ok) {
      const job = await response.json();
      window.location.assign(`/jobs/${job.id}`);
    } else if (response.status === 422) {
      await check(); // the same problems, with their lines
    } else {
      statusLine.textContent = `Not submitted: ${await errorText(response)}`;
    }
  });

  if (editor.getValue().trim()) check();
})();
