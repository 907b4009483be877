"""merger's native merge engine writes exactly what `mergekit-yaml` writes for the same config: every tensor
(torch.equal), the safetensors file byte for byte, config.json and the tokenizer; bf16 and float32 inputs,
dtype/out_dtype, gradients and filters, a DARE seed, and TIES cuts inside runs of tied magnitudes."""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.engine import Unsupported, execute, prepare
from merger.engine.methods import SLERP_CHUNK
from merger.engine.topk import argsort_mask, top_k_mask
from merger.hashing import PrefixDigest, sha256_file
from tests.tiny_models import make_family, write_yaml

MERGEKIT_YAML = str(Path(sys.executable).parent / "mergekit-yaml")
SEED = 23


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> Path:
    """bf16 Gemma 3 and Llama families, a float32 copy of the Gemma one, a Gemma family with planted ties, one with
    an embedding of several million elements (``wide``), and a copy of it whose fine-tunes left it frozen."""
    root = tmp_path_factory.mktemp("engine-models")
    for arch in ("gemma3", "llama"):
        make_family(root, arch, seed=5)
    for member in ("base", "ft1", "ft2"):
        _float32_copy(root / f"gemma3-{member}", root / f"f32-{member}")
    _plant_ties(root)
    _plant_non_finite(root)
    make_family(root, "gemma3", seed=7, prefix="wide", vocab_size=8192, hidden_size=320)
    _freeze(root)
    return root


def _float32_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    save_file({k: v.float() for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"dtype": "float32"}, indent=2, sort_keys=True) + "\n")


def _plant_ties(root: Path) -> None:
    """Fine-tunes whose task vectors take a handful of values, so most magnitudes tie at any TIES cut."""
    base = root / "gemma3-base"
    tensors = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(9)
    for i in (1, 2):
        shutil.copytree(base, root / f"tied-ft{i}")
        levels = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0]) / 64
        tuned = {k: (v.float() + levels[torch.randint(0, 5, v.shape, generator=generator)]).to(v.dtype)
                 for k, v in tensors.items()}
        save_file(tuned, root / f"tied-ft{i}" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(base, root / "tied-base")


def _plant_non_finite(root: Path) -> None:
    """``nonfinite``: the Gemma family with a NaN, an infinity and a value bf16 rounds to infinity in one fine-tune."""
    for member in ("base", "ft1", "ft2"):
        shutil.copytree(root / f"gemma3-{member}", root / f"nonfinite-{member}")
    tensors = load_file(root / "gemma3-ft2" / "model.safetensors")
    planted = tensors["model.embed_tokens.weight"].reshape(-1)
    planted[[3, 1000, 2001]] = torch.tensor([float("nan"), float("-inf"), 3.38e38], dtype=torch.bfloat16)
    save_file(tensors, root / "nonfinite-ft2" / "model.safetensors", metadata={"format": "pt"})


def _freeze(root: Path) -> None:
    """``frozen``: the wide family whose fine-tunes kept the base's embedding and norms (as LoRA fine-tunes do); the
    base's embedding holds some -0.0, which ``base + 0.0`` turns into +0.0."""
    base = load_file(root / "wide-base" / "model.safetensors")
    base["model.embed_tokens.weight"][::7, ::5] = -0.0
    for member in ("base", "ft1", "ft2"):
        shutil.copytree(root / f"wide-{member}", root / f"frozen-{member}")
        tensors = load_file(root / f"wide-{member}" / "model.safetensors")
        frozen = {k: (base[k] if k == "model.embed_tokens.weight" or "norm" in k else v) for k, v in tensors.items()}
        save_file(frozen, root / f"frozen-{member}" / "model.safetensors", metadata={"format": "pt"})


def configs(prefix: str) -> dict[str, dict]:
    base, ft1, ft2 = (f"{prefix}-{m}" for m in ("base", "ft1", "ft2"))
    two = lambda **p1: [{"model": ft1, "parameters": p1}, {"model": ft2, "parameters": {"weight": 0.4, "density": 0.6}}]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": ft1, "parameters": {"weight": 0.7}}, {"model": ft2, "parameters": {"weight": [0.1, 0.5, 0.2]}}]},
        "slerp": {"merge_method": "slerp", "base_model": ft1, "models": [{"model": ft1}, {"model": ft2}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.7]}, {"value": 0.35}]}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": two(weight=0.8), "parameters": {"lambda": 0.9}},
        "ties": {"merge_method": "ties", "base_model": base, "models": two(weight=0.6, density=0.5)},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": two(weight=0.5, density=0.5)},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base, "models": two(weight=0.5, density=0.3)},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": two(weight=1.0, density=0.8, gamma=0.05)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "models": two(weight=[{"filter": "mlp", "value": 0.3}, {"value": 0.9}], density=0.7)},
    }


def absolute(config: dict, root: Path) -> dict:
    def fix(value):
        if isinstance(value, dict):
            return {k: (str(root / v) if k in ("model", "base_model") and isinstance(v, str) else fix(v)) for k, v in value.items()}
        return [fix(v) for v in value] if isinstance(value, list) else value
    return fix(config)


def run_both(config: dict, root: Path, tmp_path: Path) -> tuple[Path, Path]:
    config = absolute(config, root)
    theirs = tmp_path / "mergekit"
    subprocess.run([MERGEKIT_YAML, str(write_yaml(tmp_path / "config.yml", config)), str(theirs), "--random-seed", str(SEED),
                    "--num-threads", "1", "--quiet", "--no-write-model-card"], check=True, capture_output=True)
    names = {config.get("base_model")} | {m["model"] for m in config["models"]}
    ours = tmp_path / "engine"
    digests = execute(prepare(config, {n: Path(n) for n in names if n}), ours, seed=SEED)
    assert digests == {path.name: sha256_file(path) for path in ours.glob("*.safetensors")}  # taken as the files were written
    return ours, theirs


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def assert_same_output(ours: Path, theirs: Path) -> None:
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(_bytes(a[name]), _bytes(b[name])), f"{name} differs"  # bitwise: NaN too
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for name in (p.name for p in theirs.iterdir()):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


CASES = [(prefix, method, extra) for method in configs("x") for prefix, extra in (
    ("gemma3", {}), ("f32", {}), ("llama", {}), ("gemma3", {"dtype": "float32", "out_dtype": "bfloat16"}))]


@pytest.mark.parametrize("prefix,method,extra", CASES, ids=[f"{p}-{m}-{'-'.join(e.values()) or 'native'}" for p, m, e in CASES])
def test_engine_equals_mergekit_yaml(prefix, method, extra, families, tmp_path):
    ours, theirs = run_both(configs(prefix)[method] | extra, families, tmp_path)
    assert_same_output(ours, theirs)
    inputs = load_file(families / f"{prefix}-ft1" / "model.safetensors")
    merged = load_file(ours / "model.safetensors")
    assert any(not torch.equal(merged[n].to(inputs[n].dtype), inputs[n]) for n in merged)  # not a copy of an input


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_ties_at_the_cut(method, families, tmp_path):
    """Task vectors whose magnitudes tie in long runs across the TIES cut: the same mask as torch's argsort."""
    config = configs("tied")[method]
    delta = (load_file(families / "tied-ft1" / "model.safetensors")["model.embed_tokens.weight"]
             - load_file(families / "tied-base" / "model.safetensors")["model.embed_tokens.weight"])
    magnitudes = delta.abs().reshape(-1).float()
    k = int(0.5 * magnitudes.numel())
    kth = torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values
    above, tied = int((magnitudes > kth).sum()), int((magnitudes == kth).sum())
    assert above < k < above + tied  # the planted ties straddle the cut
    ours, theirs = run_both(config, families, tmp_path)
    assert_same_output(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_top_k_mask_matches_argsort_on_ties(dtype):
    generator = torch.Generator().manual_seed(1)
    for n, values in [(5000, 3), (40000, 7), (257, 2), (100000, 50), (3, 2)]:
        w = (torch.randint(0, values, (n,), generator=generator) / 8).to(dtype)
        for k in (1, n // 3, n // 2, n - 1):
            assert torch.equal(top_k_mask(w.clone(), k), argsort_mask(w, k)), (n, values, k)
    w = (torch.randn(300000, generator=generator) * 0.02).to(dtype).abs()
    assert torch.equal(top_k_mask(w.clone(), 150000), argsort_mask(w, 150000))


@pytest.mark.parametrize("change,reason", [
    ({"merge_method": "della"}, "merge_method"),
    ({"merge_method": "passthrough", "models": None, "slices": [{"sources": [{"model": "M1", "layer_range": [0, 2]}]}]}, "slices"),
    ({"tokenizer_source": "base"}, "tokenizer_source"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"models": [{"model": "M1+adapter", "parameters": {"weight": 1.0}}]}, "LoRA"),
    ({"parameters": {"weight": "0.5"}}, "parameter value"),
    ({"dtype": "int8"}, "dtype"),
])
def test_unsupported_configs_go_to_mergekit(change, reason):
    config = {"merge_method": "linear", "models": [{"model": "M1", "parameters": {"weight": 1.0}}]} | change
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(Unsupported, match=reason):
        prepare(config, {"M1": Path("/nonexistent")})


def test_unsupported_architecture_goes_to_mergekit(families, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(families / "gemma3-ft1", odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"architectures": ["NoSuchForCausalLM"]}))
    merge = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]}
    with pytest.raises(Unsupported, match="NoSuchForCausalLM"):
        prepare(merge, {"a": odd, "b": families / "gemma3-ft2"})


def test_random_masks_go_to_mergekit_where_torch_draws_otherwise(families, monkeypatch):
    """The DARE replay follows this torch's generator (checked once per process); a torch that draws otherwise
    (simulated) sends randomized methods to mergekit, and leaves the others to the engine."""
    import merger.engine.draws as draws

    assert draws.replays_torch()
    monkeypatch.setattr(draws, "replays_torch", lambda: False)
    dirs = {"base": families / "gemma3-base", "ft1": families / "gemma3-ft1"}
    merge = {"base_model": "base", "models": [{"model": "base"}, {"model": "ft1", "parameters": {"weight": 1.0, "density": 0.5}}]}
    with pytest.raises(Unsupported, match="draws random masks otherwise"):
        prepare(merge | {"merge_method": "dare_ties"}, dirs)
    prepare(merge | {"merge_method": "ties"}, dirs)


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "task_arithmetic"])
def test_non_finite_inputs(method, families, tmp_path):
    """A NaN or an infinity in an input: compiled loops decline the runs they reach, torch computes those."""
    ours, theirs = run_both(configs("nonfinite")[method], families, tmp_path)
    assert_same_output(ours, theirs)
    merged = load_file(ours / "model.safetensors")["model.embed_tokens.weight"]
    assert not bool(merged.isfinite().all())


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "slerp"])
def test_frozen_tensors(method, families, tmp_path):
    """Tensors every fine-tune left as the base's (embedding, norms): the same bytes, DARE's later masks too (the
    frozen embedding's draws are still made); a negative weight makes the task vectors' sum -0.0."""
    config = configs("frozen")[method]
    if method != "slerp":
        config["models"][1]["parameters"]["weight"] = -0.4
    ours, theirs = run_both(config, families, tmp_path)
    assert_same_output(ours, theirs)
    merged = load_file(ours / "model.safetensors")["model.embed_tokens.weight"]
    assert merged.numel() > 2 * SLERP_CHUNK


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_draws_replay_torch_bernoulli(dtype):
    """DARE's masks drawn run by run from a captured state, and draws skipped, leave what torch.bernoulli does."""
    from merger.engine.draws import Stream

    for density in (0.5, 0.3, 0.123457, 1e-9):
        torch.manual_seed(3)
        stream = Stream(torch.get_rng_state())
        expected = torch.bernoulli(torch.full((2500,), density, dtype=dtype))
        torch.bernoulli(torch.full((1001,), density, dtype=dtype))
        after = torch.rand(8)
        drawn = torch.cat([stream.bernoulli(700, density, dtype), stream.bernoulli(1800, density, dtype)])
        stream.skip(1001)
        torch.set_rng_state(stream.torch_state())
        assert torch.equal(drawn, expected), density
        assert torch.equal(torch.rand(8), after), density


@pytest.mark.parametrize("prefix,method", [("gemma3", "linear"), ("gemma3", "task_arithmetic"), ("gemma3", "ties"),
                                           ("gemma3", "dare_ties"), ("gemma3", "breadcrumbs_ties"), ("wide", "slerp"),
                                           ("wide", "dare_ties"), ("frozen", "dare_ties")])
def test_merges_in_parts(prefix, method, families, tmp_path, monkeypatch):
    """Large tensors are read, merged and written a run of elements at a time (slerp: a run of its own chunks),
    DARE's masks drawn a run at a time: the same bytes."""
    from merger.engine import methods, stream

    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 333)  # tiny: every matrix is split, unevenly
    monkeypatch.setattr(methods, "LINEAR_RUN_ELEMENTS", 333)
    ours, theirs = run_both(configs(prefix)[method], families, tmp_path)
    largest = max(t.numel() for t in load_file(ours / "model.safetensors").values())
    assert largest > 2 * (SLERP_CHUNK if method == "slerp" else 333)
    assert_same_output(ours, theirs)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_runs_on_the_idle_cores_with_the_same_bits(threads, families, tmp_path, monkeypatch):
    """linear takes as many torch threads as cores are idle: on one or two, mergekit's bytes (runs of an odd
    length: each thread's share ends off the vector width)."""
    from merger import devices
    from merger.engine import methods

    seen, original = [], methods.METHODS["linear"]

    def linear(*args) -> None:
        seen.append(torch.get_num_threads())
        original.run(*args)

    monkeypatch.setattr(devices, "idle_cores", lambda: threads)
    monkeypatch.setitem(methods.METHODS, "linear", dataclasses.replace(original, run=linear))
    monkeypatch.setattr(methods, "LINEAR_RUN_ELEMENTS", 333_333)
    ours, theirs = run_both(configs("wide")["linear"], families, tmp_path)
    assert set(seen) == {threads}
    assert_same_output(ours, theirs)


def test_a_truncated_input_is_refused_when_planned_and_runs_are_read_as_stored(tmp_path):
    """The engine maps large runs of its inputs: a file shorter than its header says is refused before any read
    (a mapping past its end would crash the process); small runs are read. Both give the stored values."""
    from merger.engine.safetensors_io import MAPPED_BYTES, UnsupportedFile, read_header, view

    path = tmp_path / "model.safetensors"
    tensors = {"large": torch.randn(MAPPED_BYTES // 2 + 7), "small": torch.randn(5, 3)}
    save_file(tensors, path)
    stored = read_header(path)
    assert torch.equal(view(stored["large"]), tensors["large"]) and torch.equal(view(stored["small"]), tensors["small"])
    assert torch.equal(view(stored["large"], slice(1000, MAPPED_BYTES // 4 + 1000)), tensors["large"][1000:MAPPED_BYTES // 4 + 1000])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(UnsupportedFile, match="shorter than its header"):
        read_header(path)


@pytest.mark.parametrize("method", ["linear", "ties"])  # in the files' order; two tensors at once, the largest first
def test_each_shard_gets_the_digest_of_its_bytes(method, families, tmp_path, monkeypatch):
    from merger.engine.run import MergePlan

    config = absolute(configs("gemma3")[method], families)
    plan = prepare(config, {n: Path(n) for n in {config.get("base_model")} | {m["model"] for m in config["models"]} if n})
    whole = MergePlan.shards
    monkeypatch.setattr(MergePlan, "shards", lambda self: whole(self, max_bytes=20_000))
    digests = execute(plan, tmp_path / "out", seed=SEED)
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and digests == {path.name: sha256_file(path) for path in files}


def test_a_prefix_digest_hashes_ranges_final_in_any_order(tmp_path):
    path, size = tmp_path / "file", 5 * (1 << 20) + 123  # more than one read of the hashing thread
    content = random.Random(1).randbytes(size)
    cuts = sorted(random.Random(2).sample(range(1, size), 40))
    ranges = list(zip([0, *cuts], [*cuts, size]))
    random.Random(3).shuffle(ranges)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, size)
    digest = PrefixDigest(path, size)
    for start, stop in ranges:
        os.pwrite(fd, b"x" * (stop - start), start)  # rewritten before it is final
        os.pwrite(fd, content[start:stop], start)
        digest.final(start, stop)
    os.close(fd)
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()

    unfinished = PrefixDigest(path, size)
    unfinished.final(0, 10)
    with pytest.raises(ValueError, match=f"bytes 10 to {size} were never declared final"):
        unfinished.hexdigest()
    shorter = PrefixDigest(path, size + 1)  # the file ends before the size it was to have
    shorter.final(0, size + 1)
    with pytest.raises(OSError, match=f"file ended at byte {size} of {size + 1}"):
        shorter.hexdigest()
