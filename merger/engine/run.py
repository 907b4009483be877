"""Plan a merge from the inputs' headers, then stream it: one output tensor at a time, in mergekit's order
(tensor names sorted), each input tensor read when needed and each result written straight to its place."""

import ctypes
import json
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from merger import devices
from merger.engine.architecture import UnsupportedArchitecture, planned_weights
from merger.engine.config import EngineConfig, Unsupported
from merger.engine.safetensors_io import PlannedFile, StoredTensor, TensorSpec, UnsupportedFile, model_tensors
from merger.engine.stream import Inputs, Output

if TYPE_CHECKING:
    from merger.engine.draws import Stream

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAX_SHARD_BYTES = 5 * 1000**3  # mergekit's default out_shard_size
# what mergekit copies as the tokenizer when the config has no tokenizer section
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "chat_template.jinja", "generation_config.json",
                   "chat_template.json", "video_preprocessor_config.json")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    t: float
    inputs: tuple[StoredTensor, ...]  # in the config's model order
    spec: TensorSpec


@dataclass(frozen=True)
class MergePlan:
    config: EngineConfig
    dirs: dict[str, Path]
    tensors: tuple[OutputTensor, ...]  # in mergekit's execution order
    donor: Path  # config.json and tokenizer come from here

    def shards(self, max_bytes: int = MAX_SHARD_BYTES) -> list[list[OutputTensor]]:
        """mergekit's shards: filled in save order, a new one when the next tensor would pass max_bytes."""
        shards: list[list[OutputTensor]] = [[]]
        size = 0
        for tensor in self.tensors:
            if shards[-1] and size + tensor.spec.nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.spec.nbytes
        return shards


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def plan(config: EngineConfig, dirs: dict[str, Path]) -> MergePlan:
    """The output tensors, or Unsupported when mergekit would plan something the engine does not follow."""
    configs = {m: json.loads((dirs[m] / "config.json").read_text()) for m in config.models}
    try:
        weights = {m: planned_weights(c) for m, c in configs.items()}
        stored = {m: model_tensors(dirs[m]) for m in config.models}
    except (UnsupportedArchitecture, UnsupportedFile) as exc:
        raise Unsupported(str(exc)) from exc
    first = weights[config.models[0]]
    if any(w != first for w in weights.values()):
        raise Unsupported("inputs of different architectures or depths")
    load_dtype = _dtype(config.dtype)
    outputs = []
    for weight in first:
        present = [weight.name in stored[m] for m in config.models]
        if not any(present) and weight.optional and not any(a in stored[m] for a in weight.aliases for m in config.models):
            continue
        if not all(present):
            raise Unsupported(f"{weight.name} is missing from some inputs")
        inputs = tuple(stored[m][weight.name] for m in config.models)
        if any(i.spec.dtype not in FLOAT_DTYPES for i in inputs) or len({i.spec.shape for i in inputs}) != 1:
            raise Unsupported(f"{weight.name}: non-float tensors or differing shapes")
        dtype = _dtype(config.out_dtype) or _compute_dtype(inputs, load_dtype)
        outputs.append(OutputTensor(weight.name, weight.t, inputs, TensorSpec(dtype, inputs[0].spec.shape)))
    donor = dirs[config.base or config.models[0]]
    if not (donor / "tokenizer_config.json").exists() or not any((donor / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise Unsupported("the tokenizer would be re-serialized by transformers")
    outputs.sort(key=lambda o: o.name)
    return MergePlan(config, dirs, tuple(outputs), donor)


def execute(merge: MergePlan, out_dir: Path, *, seed: int | None = None, device: str = "cpu",
            on_tensor: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Write the merged model into ``out_dir`` (created); the sha256 of each weights file written, by name.
    ``on_tensor(done, total)`` may raise to stop."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = devices.resolve(device)
    config, method = merge.config, merge.config.method
    shards = merge.shards()
    _large_allocations_unmapped(method.mmap_threshold)
    load_dtype = _dtype(config.dtype)
    base_index = config.models.index(config.base) if config.base is not None and method.needs_base else None
    threads = torch.get_num_threads() if _at_once(merge, device) else 1
    files: list[PlannedFile] = []
    try:
        for name, shard in zip(_shard_names(len(shards)), shards):
            files.append(PlannedFile(out_dir / name, {t.name: t.spec for t in shard}))
        where = {t.name: f for f, shard in zip(files, shards) for t in shard}
        with devices.torch_threads(_torch_thread_count(merge, threads, device)):
            if seed is not None:
                torch.manual_seed(seed)
            replaying = method.randomized and device == "cpu"
            streams = _draw_streams(merge, base_index) if replaying else [None] * len(merge.tensors)

            def merge_one(k: int) -> None:
                output = merge.tensors[k]
                shared = config.shared(output.name, output.t)
                params = [config.per_model(m, output.name, output.t) for m in config.models]
                inputs = Inputs(output.inputs, load_dtype, _compute_dtype(output.inputs, load_dtype), device, streams[k])
                method.run(inputs, Output(where[output.name], output.name, output.spec.dtype), base_index, shared, params)
                where[output.name].finished(output.name)

            placed = {t.name: (i, f.offsets[t.name]) for i, (f, shard) in enumerate(zip(files, shards)) for t in shard}
            order = _order(merge, threads, replaying or not method.randomized, lambda k: placed[merge.tensors[k].name])
            _in_order(merge_one, order, threads, on_tensor or (lambda done, total: None))
    except BaseException:
        for f in files:
            f.digest.abandon()
        raise
    finally:
        for f in files:
            f.close()
    digests = {f.path.name: f.digest.hexdigest() for f in files}
    if len(shards) > 1:
        _write_index(out_dir, shards)
    _write_config(merge, out_dir)
    for name in TOKENIZER_FILES:
        if (merge.donor / name).exists():
            shutil.copyfile(merge.donor / name, out_dir / name)
    return digests


def _order(merge: MergePlan, threads: int, any_order: bool, placed: Callable[[int], tuple[int, int]]) -> Sequence[int]:
    """The order tensors are merged in: at once, the largest first (the others are merged meanwhile instead of
    waiting behind it at the end); else where they lie in the files (``placed(k)``: file, offset), so that each
    file's digest follows its writing; mergekit's order where the result depends on it (random draws from one
    generator, not replayed)."""
    tensors = merge.tensors
    if threads > 1:
        return sorted(range(len(tensors)), key=lambda k: -tensors[k].spec.numel)
    return sorted(range(len(tensors)), key=placed) if any_order else range(len(tensors))


def _at_once(merge: MergePlan, device: str) -> bool:
    """Whether tensors may be merged concurrently, each on one torch thread, and still give mergekit's bits: a method
    that allows it, on the CPU, either randomized (mergekit's result is reproducible on one thread only, and the
    engine matches that) or summing no whole tensor (rescaling sums in an order that depends on the threads)."""
    config = merge.config
    if not config.method.tensors_at_once or device != "cpu":
        return False
    return config.method.randomized or not any(config.shared(t.name, t.t)["rescale"] for t in merge.tensors)


def _draw_streams(merge: MergePlan, base_index: int | None) -> list["Stream"]:
    """DARE on the CPU: where each tensor's draws start in the generator's sequence (a replay of its state now), so
    that tensors can be merged in any order. Every non-base input whose density is below 1 draws one value per
    element, changed or not (skipping draws costs a fraction of making them)."""
    from merger.engine.draws import Stream

    config, stream, starts = merge.config, Stream(torch.get_rng_state()), []
    for output in merge.tensors:
        starts.append(stream.copy())
        for i, model in enumerate(config.models):
            if i != base_index and config.per_model(model, output.name, output.t)["density"] < 1:
                stream.skip(output.spec.numel)
    return starts


def _in_order(work: Callable[[int], None], order: Sequence[int], threads: int, done: Callable[[int, int], None]) -> None:
    """work(k) for each k of ``order``, up to ``threads`` at once (each holds one tensor's buffers); ``done(finished,
    total)`` on this thread after each (it may raise to stop: the tensors under way finish first)."""
    if threads <= 1:
        for finished, k in enumerate(order, start=1):
            work(k)
            done(finished, len(order))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="merger-tensors") as pool:
        pending: deque[Future] = deque()
        finished = 0

        def finish_oldest() -> None:
            nonlocal finished
            pending.popleft().result()
            finished += 1
            done(finished, len(order))

        for k in order:
            pending.append(pool.submit(work, k))
            if len(pending) == threads:
                finish_oldest()
        while pending:
            finish_oldest()


def _compute_dtype(inputs: tuple[StoredTensor, ...], load_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype mergekit merges in: the config's dtype if any, else the promotion of the inputs' dtypes."""
    if load_dtype:
        return load_dtype
    dtype = inputs[0].spec.dtype
    for stored in inputs[1:]:
        dtype = torch.promote_types(dtype, stored.spec.dtype)
    return dtype


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_index(out_dir: Path, shards: list[list[OutputTensor]]) -> None:
    names = _shard_names(len(shards))
    index = {
        "metadata": {"total_size": sum(t.spec.nbytes for shard in shards for t in shard), "mergekit_version": "0.1.5"},
        "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(merge: MergePlan, out_dir: Path) -> None:
    """The donor's config.json, with the output dtype mergekit records (transformers' layout: sorted, indent 2)."""
    config = json.loads((merge.donor / "config.json").read_text())
    dtype = merge.config.out_dtype or merge.config.dtype
    if dtype:
        config.pop("torch_dtype", None)
        config["dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _large_allocations_unmapped(threshold: int) -> None:
    """Runs of a large tensor come and go in several sizes; glibc's heap keeps what they free (its mmap threshold
    rises to the largest block freed), which grew RSS by a gigabyte over slerp's passes on a 168M-element
    embedding. A fixed threshold (each method's) maps every larger block and returns it on free."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except OSError:  # not glibc
        pass


def _torch_thread_count(merge: MergePlan, threads: int, device: str) -> int | None:
    """torch's thread count for the merge (None: as it is, mergekit's: reductions' bits depend on it). One for
    randomized methods (they reduce in bf16, and mergekit reproduces them with -j 1 only) and for tensors merged
    ``threads`` at once; the cores idle now for a method whose bits do not depend on it (beside one busy process on
    2 cores, torch's two threads waited for each other: a linear merge of Gemma 3 270M took 4.4-5.3 s on two threads,
    2.1-2.4 s on one)."""
    method = merge.config.method
    if method.randomized or threads > 1:
        return 1
    return devices.idle_cores() if method.elementwise and device == "cpu" else None
