// The lineage graph: ancestors and descendants from the API, cut at a depth, drawn by Cytoscape; a click opens a model.
(function () {
  "use strict";
  const container = document.getElementById("graph");
  const rootId = container.dataset.model;
  const direction = document.getElementById("direction");
  const depth = document.getElementById("depth");
  const list = document.getElementById("graph-list");
  const statusLine = document.getElementById("graph-status");
  const COLORS = { model: "#2563eb", adapter: "#9333ea", placeholder: "#9ca3af" };
  let lineages = null;

  async function load(way) {
    const response = await fetch(`/v1/models/${rootId}/lineage?direction=${way}`);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return response.json();
  }

  // the nodes of a lineage within `limit` steps of its root, and the edges between them
  function within(lineage, limit, nodes, edges) {
    const ancestors = lineage.direction === "ancestors";
    const steps = new Map([[lineage.root, 0]]);
    const queue = [lineage.root];
    while (queue.length) {
      const at = queue.shift();
      for (const edge of lineage.edges) {
        const [from, to] = ancestors ? [edge.child, edge.parent] : [edge.parent, edge.child];
        if (from === at && !steps.has(to) && steps.get(at) < limit) { steps.set(to, steps.get(at) + 1); queue.push(to); }
      }
    }
    for (const node of lineage.nodes) if (steps.has(node.id)) nodes.set(node.id, node);
    for (const edge of lineage.edges) {
      if (steps.has(edge.child) && steps.has(edge.parent)) edges.set(`${edge.parent}>${edge.child}>${edge.position}`, edge);
    }
  }

  function label(node) {
    return node.hidden ? `hidden ${node.id.slice(0, 8)}` : `${node.name || "unnamed"}\n${node.id.slice(0, 8)}`;
  }

  function draw() {
    const nodes = new Map(), edges = new Map();
    const limit = Number(depth.value);
    if (direction.value !== "descendants") within(lineages.ancestors, limit, nodes, edges);
    if (direction.value !== "ancestors") within(lineages.descendants, limit, nodes, edges);
    const children = new Set([...edges.values()].map((e) => e.child));
    const elements = [
      ...[...nodes.values()].map((n) => ({ data: { id: n.id, label: label(n), hidden: !!n.hidden, kind: n.kind || "placeholder" },
                                           classes: n.id === rootId ? "root" : "" })),
      ...[...edges.entries()].map(([key, e]) => ({ data: { id: key, source: e.parent, target: e.child,
        label: `${e.relation}/${e.role}` + (e.weight === null || e.weight === undefined ? "" : ` ×${e.weight}`) } })),
    ];
    const graph = cytoscape({
      container, elements, wheelSensitivity: 0.3,
      layout: { name: "breadthfirst", directed: true, spacingFactor: 1.1, animate: false,
                roots: [...nodes.keys()].filter((id) => !children.has(id)) },
      style: [
        { selector: "node", style: { "label": "data(label)", "text-wrap": "wrap", "font-size": 11, "text-valign": "bottom",
                                     "text-margin-y": 4, "width": 22, "height": 22,
                                     "background-color": (n) => COLORS[n.data("kind")] || COLORS.model } },
        { selector: "node.root", style: { "border-width": 4, "border-color": "#f59e0b" } },
        { selector: "node[?hidden]", style: { "background-color": "#d1d5db", "shape": "round-rectangle" } },
        { selector: "edge", style: { "curve-style": "bezier", "target-arrow-shape": "triangle", "width": 2, "line-color": "#94a3b8",
                                     "target-arrow-color": "#94a3b8", "label": "data(label)", "font-size": 10,
                                     "text-background-color": "#ffffff", "text-background-opacity": 1, "text-rotation": "autorotate" } },
      ],
    });
    graph.on("tap", "node", (event) => {
      if (!event.target.data("hidden")) window.location.assign(`/models/${event.target.id()}`);
    });
    list.replaceChildren(...[...nodes.values()].map((n) => {
      const item = document.createElement("li");
      if (n.hidden) { item.textContent = `${n.id.slice(0, 12)} (a model you may not see)`; return item; }
      const link = document.createElement("a");
      link.href = `/models/${n.id}`;
      link.textContent = n.name || n.id.slice(0, 12);
      item.append(link, ` ${n.kind || ""}${n.id === rootId ? " (this model)" : ""}`);
      return item;
    }));
    statusLine.textContent = `${nodes.size} models, ${edges.size} edges`;
  }

  Promise.all([load("ancestors"), load("descendants")]).then(([ancestors, descendants]) => {
    lineages = { ancestors, descendants };
    draw();
    direction.addEventListener("change", draw);
    depth.addEventListener("change", draw);
  }).catch((error) => { statusLine.textContent = `Could not load the lineage: ${error.message}`; });
})();
