"""Benchmark `merger run` against its real peers on Gemma 3 270M: `mergekit-yaml` for merges, PEFT's
`merge_and_unload` for folding LoRA adapters, llama.cpp's converter and quantizer run by hand for GGUF.

One command, from the repo root:

    .venv/bin/python benchmarks/run.py [--methods linear,slerp,ties,dare_ties,fold,q8_0,q4_k_m] [--work DIR] [--base DIR] [--repeat 3]

1. prepare: import Gemma 3 270M into a benchmark store (or copy the directory --base names) to
   <work>/models/base; fold each fixture LoRA adapter into it (float32, saved as bf16) as
   <work>/models/ft-{sentiment,json}. Every step whose output exists is skipped.
2. for each method, run both CLIs end to end (Python start-up included) on the same merge, --repeat
   times (default 3) in alternating order, each run after `sync` (no other run's output is still being
   written back) and on fresh output directories, measuring each child's wall time and peak RSS (os.wait4
   reports the usage of that one child); the table gives the median time and the largest peak. Merge
   methods are measured twice on merger's side: `merger run` (the CLI, which hands these configs to
   merger's engine) and the engine alone (benchmarks/engine_merge.py, the same command line as
   mergekit-yaml).
   fold: both fixture adapters at weight 1.0 into the base, merger's adapters stage vs
   benchmarks/peft_fold.py. q8_0, q4_k_m: the base quantized to GGUF, merger's quantize stage vs
   benchmarks/llama_cpp_quantize.py (the same llama.cpp converter, then its quantizer).
3. check that merger's output tensors are bit-identical to the peer's; print a table and write
   the rows to <work>/results.json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from merger.recipe import RANDOMIZED_METHODS

sys.path.insert(0, str(Path(__file__).parent))
import evaluation  # noqa: E402 - benchmarks/evaluation.py, beside this file

METHODS = ("linear", "slerp", "ties", "dare_ties", "fold", "q8_0", "q4_k_m")
GGUF_METHODS = ("q8_0", "q4_k_m")
# the LoRA fixtures live beside the checkout (../shared/fixtures), as on every developer and CI machine
ADAPTERS = Path(os.environ.get("MERGER_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "adapters"
FINE_TUNES = ("sentiment", "json")
SEED = 42
BIN = Path(sys.executable).parent  # the venv's bin: mergekit-yaml and merger live next to python
console = Console()


@dataclass
class Measured:
    seconds: float
    peak_rss_gb: float
    stdout: str


@dataclass
class Row:
    method: str
    peer: str
    peer_s: float
    merger_s: float
    time_ratio: float
    peer_rss_gb: float
    merger_rss_gb: float
    rss_ratio: float
    outputs_equal: bool


# -----------------------------------------------------------------------------
# running a command alone, measured


# Linux's peak RSS of a process started by vfork (as subprocess starts one) counts the parent's peak: at exec the
# memory it leaves is the parent's. A small launcher process forks the measured command, so that its peak is its own.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    json.dump({"status": status, "maxrss_kib": usage.ru_maxrss}, report)
"""


def measure(cmd: list[str], env: dict[str, str], log: Path) -> Measured:
    """Run cmd to completion, after flushing every file written so far; its wall time and peak RSS (children it
    waited for included)."""
    report = log.with_suffix(".usage.json")
    os.sync()
    with open(log.with_suffix(".out"), "w+") as out, open(log.with_suffix(".err"), "w") as err:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *cmd], env=env, stdout=out, stderr=err, check=True)
        seconds = time.perf_counter() - start
        out.seek(0)
        stdout = out.read()
    usage = json.loads(report.read_text())
    if (code := os.waitstatus_to_exitcode(usage["status"])) != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}); see {log.with_suffix('.err')}")
    return Measured(seconds, usage["maxrss_kib"] * 1024 / 1e9, stdout)  # ru_maxrss is in KiB on Linux


def merger_env(work: Path) -> dict[str, str]:
    return os.environ | {"MERGER_HOME": str(work / "home"), "MERGER_MODEL_ROOTS": str(work / "models")}


# -----------------------------------------------------------------------------
# inputs: base + two full fine-tunes, cached in <work>/models


def build(out: Path, make: Callable[[Path], None]) -> None:
    """make(tmp) writes a model dir; it becomes `out` only once complete, so reruns skip it."""
    if out.exists():
        console.print(f"cached: {out}")
        return
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"building {out} ...")
    make(tmp)
    tmp.rename(out)


def import_base(work: Path, dest: Path, source: Path | None) -> None:
    if source is not None:
        shutil.copytree(source, dest, copy_function=shutil.copyfile)
        return
    env = merger_env(work)
    result = subprocess.run([str(BIN / "merger"), "import-gguf", "--json"], env=env, capture_output=True, text=True, check=True)
    shutil.copytree(json.loads(result.stdout)["path"], dest, copy_function=shutil.copyfile)


def fold(base: Path, adapter: Path, dest: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    for tokenizer_file in base.glob("tokenizer*"):
        shutil.copyfile(tokenizer_file, dest / tokenizer_file.name)


def prepare(work: Path, base: Path | None) -> Path:
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    build(models / "base", lambda tmp: import_base(work, tmp, base))
    for task in FINE_TUNES:
        build(models / f"ft-{task}", lambda tmp, task=task: fold(models / "base", ADAPTERS / task, tmp))
    return models


# -----------------------------------------------------------------------------
# configs: the same merge, with absolute paths for mergekit and root-relative names for merger


def merge_config(method: str, model: Callable[[str], str]) -> dict:
    base, sentiment, json_ = model("base"), model("ft-sentiment"), model("ft-json")
    if method == "linear":
        spec = {"models": [{"model": m, "parameters": {"weight": 0.5}} for m in (sentiment, json_)]}
    elif method == "slerp":
        spec = {"base_model": sentiment, "models": [{"model": sentiment}, {"model": json_}], "parameters": {"t": 0.5}}
    else:  # ties, dare_ties
        spec = {"base_model": base, "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in (sentiment, json_)]}
    return {"merge_method": method, **spec, "dtype": "bfloat16"}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -----------------------------------------------------------------------------
# one method: both CLIs, alternating who goes first


def bench(method: str, order: int, work: Path, models: Path, repeat: int) -> list[Row]:
    runs = work / "runs" / method
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    peer_out = runs / "peer-out"
    # merger names its output after the recipe file: bench-<method> in the store
    if method == "fold":
        peer = "peft merge_and_unload"
        peer_cmd = [sys.executable, str(Path(__file__).parent / "peft_fold.py"), str(models / "base"), str(peer_out),
                    *(str(ADAPTERS / task) for task in FINE_TUNES)]
        merger_cfg = write_yaml(runs / "bench-fold.yaml", fold_recipe())
        env = merger_env(work) | {"MERGER_MODEL_ROOTS": f"{models}:{ADAPTERS}"}
    elif method in GGUF_METHODS:
        from merger.gguf_tools import find_converter
        from merger.settings import Settings

        peer = "llama.cpp convert (+ quantize)"
        peer_out = runs / "peer-out.gguf"
        converter = find_converter(Settings().tools_dir).script
        peer_cmd = [sys.executable, str(Path(__file__).parent / "llama_cpp_quantize.py"), str(converter), str(models / "base"),
                    str(peer_out), method.upper()]
        merger_cfg = write_yaml(runs / f"bench-{method}.yaml", {"stages": [{"name": f"bench-{method}", "quantize": {"model": "base", "type": method.upper()}}]})
        env = merger_env(work)
    else:
        peer = "mergekit-yaml"
        mergekit_cfg = write_yaml(runs / "mergekit.yaml", merge_config(method, lambda name: str(models / name)))
        peer_cmd = [str(BIN / "mergekit-yaml"), str(mergekit_cfg), str(peer_out), "--random-seed", str(SEED)]
        if method in RANDOMIZED_METHODS:  # a seeded random merge is reproducible only single-threaded; merger runs it so
            peer_cmd += ["--num-threads", "1"]
        merger_cfg = write_yaml(runs / f"bench-{method}.yaml", merge_config(method, lambda name: name) | {"seed": SEED})
        env = merger_env(work)

    def run_peer() -> Measured:
        fresh(peer_out)
        return measure(peer_cmd, dict(os.environ), runs / "peer")

    def run_merger() -> Measured:
        return measure([str(BIN / "merger"), "run", str(merger_cfg), "--force", "--json"], env, runs / "merger")

    engine_out = runs / "engine-out"

    def run_engine() -> Measured:
        fresh(engine_out)
        return measure([sys.executable, str(Path(__file__).parent / "engine_merge.py"), peer_cmd[1], str(engine_out),
                        "--random-seed", str(SEED)], merger_env(work), runs / "engine")

    ours = [("merger run", run_merger)] + ([("merger engine", run_engine)] if peer == "mergekit-yaml" else [])
    console.print(f"[bold]{method}[/]: {repeat} runs of each, {peer} first in the {'odd' if order % 2 == 0 else 'even'} ones")
    peer_runs: list[Measured] = []
    our_runs: dict[str, list[Measured]] = {label: [] for label, _ in ours}
    for r in range(repeat):
        if (order + r) % 2 == 0:
            peer_runs.append(run_peer())
        for label, run in ours:
            our_runs[label].append(run())
        if (order + r) % 2 == 1:
            peer_runs.append(run_peer())
        console.print(f"  run {r + 1}: " + ", ".join(f"{label} {runs[-1].seconds:.2f} s" for label, runs in
                                                     [(peer, peer_runs), *our_runs.items()]))
    pr = typical(peer_runs)
    measured = [(label, typical(runs)) for label, runs in our_runs.items()]

    rows = []
    for label, mg in measured:
        merger_out = Path(json.loads(mg.stdout)["path"]) if label == "merger run" else engine_out
        if method in GGUF_METHODS:
            equal = same_gguf_tensors(peer_out, next(merger_out.glob("*.gguf")))
        else:
            equal = same_tensors(peer_out / "model.safetensors", merger_out / "model.safetensors")
        console.print(f"  {label}: {mg.seconds:.1f} s, {mg.peak_rss_gb:.2f} GB; {peer}: {pr.seconds:.1f} s, {pr.peak_rss_gb:.2f} GB; "
                      f"outputs equal: {'[green]yes' if equal else '[red]NO'}[/]")
        rows.append(Row(
            f"{method} ({label})", peer,
            round(pr.seconds, 2), round(mg.seconds, 2), round(mg.seconds / pr.seconds, 3),
            round(pr.peak_rss_gb, 3), round(mg.peak_rss_gb, 3), round(mg.peak_rss_gb / pr.peak_rss_gb, 3),
            equal,
        ))
    return rows


def fresh(out: Path) -> None:
    """Remove an earlier run's output (not timed), so that every run writes a new file."""
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)


def typical(runs: list[Measured]) -> Measured:
    """The median wall time, the largest peak RSS, the last run's output."""
    return Measured(statistics.median(m.seconds for m in runs), max(m.peak_rss_gb for m in runs), runs[-1].stdout)


def fold_recipe() -> dict:
    """Both fixture adapters folded into the base at weight 1.0, as peft_fold.py does."""
    adapters = [{"path": task, "weight": 1.0} for task in FINE_TUNES]  # found under the ADAPTERS root
    # the adapters name google/gemma-3-270m; the base here is a plain directory called "base"
    spec = {"base": "base", "mode": "fold", "adapters": adapters, "allow_other_base": True}
    return {"stages": [{"name": "bench-fold", "adapters": spec}]}


def same_gguf_tensors(a: Path, b: Path) -> bool:
    """Same tensor names, types and bytes (the metadata differs: the model's name)."""
    from gguf import GGUFReader

    ta, tb = ({t.name: t for t in GGUFReader(f).tensors} for f in (a, b))
    return ta.keys() == tb.keys() and all(ta[k].tensor_type == tb[k].tensor_type and (ta[k].data == tb[k].data).all() for k in ta)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".work", help="inputs, outputs, store, results")
    parser.add_argument("--base", type=Path, help="a Gemma 3 270M directory to copy as the base instead of importing it")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side per method (the median time is shown)")
    parser.add_argument("--evaluation", type=Path, metavar="STORE", help="then benchmarks/evaluation.py on STORE (see there)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    work = args.work.resolve()

    console.print(f"cores: {os.cpu_count()}  load average {os.getloadavg()}  mergekit {version('mergekit')}  torch {version('torch')}  transformers {version('transformers')}")
    models = prepare(work, args.base)
    rows = [row for i, method in enumerate(methods) for row in bench(method, i, work, models, args.repeat)]
    console.print(f"load average after: {os.getloadavg()}")

    table = Table(title=f"merger run vs its peer (end-to-end CLI, Gemma 3 270M: base + 2 fine-tunes; fold: base + 2 LoRAs; "
                        f"median of {args.repeat} runs, largest peak RSS)")
    for header in ("method", "peer", "peer s", "merger s", "time ratio", "peer peak RSS GB", "merger peak RSS GB", "RSS ratio", "outputs equal"):
        table.add_column(header, justify="left" if header in ("method", "peer") else "right", overflow="fold")
    for r in rows:
        table.add_row(*(str(v) for v in asdict(r).values()))
    console.print(table)
    (work / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    console.print(f"rows written to {work / 'results.json'}")
    if args.evaluation:
        evaluation.main(["--store", str(args.evaluation)])


if __name__ == "__main__":
    main()
