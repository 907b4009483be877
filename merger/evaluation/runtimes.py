"""Runtimes: what loads a model directory for scoring, and what it can do once loaded.

A runtime has a ``name`` (shown in result tables) and ``load(model_dir, dtype=..., tokenizer_dir=...)``
returning a ``LoadedModel``: encode, decode, per-token log-probabilities of token sequences and greedy
continuation. The metrics use only that, so every runtime is measured by the same code.

- ``transformers``: a safetensors Hugging Face directory.
- ``llama.cpp`` (llama-cpp-python, when importable) and ``transformers-gguf`` (transformers
  ``gguf_file=``, dequantized): a directory holding exactly one ``*.gguf`` file, as the quantize stage
  stores it. transformers-gguf takes the tokenizer from the GGUF, or, when transformers can't read it,
  from ``tokenizer_dir`` (the unquantized source).
"""

import importlib.util
from contextlib import contextmanager
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Protocol

import torch

from merger.errors import MergerError
from merger.gguf_tools import native_stderr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGITS_BUDGET_BYTES = 1 << 30  # float32 logits one transformers forward pass may hold
LLAMA_CPP_MAX_CONTEXT = 4096  # llama-cpp-python keeps logits for every position: context × vocabulary floats


class CannotEvaluate(MergerError):
    """A model that a runtime cannot load or run; the message says which and why."""


class LoadedModel(Protocol):
    runtime: str
    context_length: int

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Token ids; ``special``: add special tokens (BOS) as the model's tokenizer does."""

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped."""

    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """For each sequence, log p(token[t] | tokens[:t]) for t = 1..len-1 (float32)."""

    def next_token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(· | ids[:t]) over the whole vocabulary for t = 1..len-1: (len - 1) × vocabulary, float32."""

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``ids``: at most ``max_new_tokens``, ending at an end-of-sequence token."""

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        """``greedy`` of each prompt with its own budget, computed together where the runtime can."""


class Runtime(Protocol):
    name: str

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None) -> LoadedModel: ...

    def versions(self) -> dict[str, str]: ...


def gguf_file(model_dir: Path) -> Path | None:
    """The one ``*.gguf`` file of a GGUF model directory; None for other directories."""
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) > 1:
        raise CannotEvaluate(f"{model_dir}: holds {len(files)} .gguf files; a GGUF model directory holds exactly one")
    return files[0] if files else None


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def runtime_for(model_dir: Path, choice: str = "auto") -> "Runtime":
    """The runtime for a model directory. ``choice`` concerns GGUF models (safetensors ones always run in
    transformers): ``auto`` prefers llama.cpp where it is installed."""
    if gguf_file(model_dir) is None:
        if not any(model_dir.glob("*.safetensors")):
            raise CannotEvaluate(f"{model_dir}: holds neither .safetensors weights nor a .gguf file")
        return Transformers()
    if choice == "transformers":
        return TransformersGGUF()
    if llama_cpp_available():
        return LlamaCpp()
    if choice == "llama.cpp":
        raise CannotEvaluate("runtime llama.cpp asked for, but llama-cpp-python is not installed (pip install -e .[gguf])")
    return TransformersGGUF()


# --- transformers -------------------------------------------------------------------------------------------


class HFModel:
    """A transformers causal LM and its tokenizer (also what lm-evaluation-harness is given)."""

    def __init__(self, runtime: str, model, tokenizer):
        self.runtime, self.model, self.tokenizer = runtime, model.eval(), tokenizer
        self.context_length = getattr(model.config, "max_position_embeddings", None) or 2048

    def encode(self, text: str, *, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        # a forward pass holds logits for every position: sequences × length × vocabulary floats (Gemma 3's
        # 262,144-token vocabulary makes that 0.5 GB per 512-token window), so passes are sized to a budget
        vocabulary = self.model.get_output_embeddings().weight.shape[0]
        per_pass = max(1, LOGITS_BUDGET_BYTES // (max(map(len, sequences)) * vocabulary * 4))
        return [row for start in range(0, len(sequences), per_pass) for row in self._logprobs(sequences[start : start + per_pass])]

    @torch.inference_mode()
    def _logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        longest = max(map(len, sequences))
        ids = torch.zeros(len(sequences), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):  # right-padded: padding never precedes a scored token
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        picked = []
        for row, seq in enumerate(sequences):  # one row at a time: no second copy of all the logits
            scores = logits[row, : len(seq) - 1].float()
            targets = ids[row, 1 : len(seq), None]
            picked.append(scores.gather(-1, targets)[:, 0] - scores.logsumexp(-1))
        return picked

    @torch.inference_mode()
    def next_token_logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return self.greedy_batch([ids], [max_new_tokens])[0]

    @torch.inference_mode()
    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        from transformers import StoppingCriteriaList

        longest = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left-padded: every prompt ends where its continuation starts
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max(max_new_tokens), do_sample=False,
                                  pad_token_id=pad, stopping_criteria=StoppingCriteriaList([_OwnBudgets(longest, max_new_tokens)]))
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return [_through_first(out[row, longest:longest + budget].tolist(), eos) for row, budget in enumerate(max_new_tokens)]


class _OwnBudgets:
    """A stopping criterion: each sequence is done once it has its own number of new tokens."""

    def __init__(self, prompt_length: int, budgets: list[int]):
        self.prompt_length, self.budgets = prompt_length, torch.tensor(budgets)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return input_ids.shape[1] - self.prompt_length >= self.budgets


def _through_first(tokens: list[int], stops: set[int]) -> list[int]:
    """``tokens`` up to and including the first of ``stops`` (what follows it in a batch is padding)."""
    return next((tokens[: i + 1] for i, token in enumerate(tokens) if token in stops), tokens)


class Transformers:
    name = "transformers"

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None) -> HFModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = _loading(model_dir, lambda: AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False))
        tokenizer = _loading(model_dir, lambda: AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False))
        return HFModel(self.name, model, tokenizer)

    def versions(self) -> dict[str, str]:
        return {"transformers": version("transformers"), "torch": version("torch")}


class TransformersGGUF(Transformers):
    name = "transformers-gguf"

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None) -> HFModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        path = gguf_file(model_dir)
        with _quiet_gguf_conversion():
            model = _loading(path, lambda: AutoModelForCausalLM.from_pretrained(
                model_dir, gguf_file=path.name, dtype=DTYPES[dtype], quantization_config=GgufConfig(dequantize=True)))
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a tokenizer it can't convert
            if tokenizer_dir is None:
                raise CannotEvaluate(f"{path}: transformers can't read its tokenizer ({type(exc).__name__}: {exc}) "
                                    "and no unquantized source is recorded in lineage to take it from") from None
            tokenizer = _loading(tokenizer_dir, lambda: AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False))
        return HFModel(self.name, model, tokenizer)

    def versions(self) -> dict[str, str]:
        return super().versions() | {"gguf": version("gguf")}


@contextmanager
def _quiet_gguf_conversion():
    """transformers' GGUF reader draws its own tqdm bar, which ``disable_progress_bar`` does not reach."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as reader

    original = reader.tqdm
    reader.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


def _loading(where: Path, load):
    """Run a transformers load; its errors (unknown architecture, bad files) become one clear message."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return load()
    except (ValueError, KeyError, OSError, TypeError, AttributeError, NotImplementedError) as exc:
        raise CannotEvaluate(f"{where}: transformers {version('transformers')} can't load it as a causal language model "
                            f"({type(exc).__name__}: {exc})") from None
    finally:
        hf_logging.enable_progress_bar()


# --- llama.cpp ----------------------------------------------------------------------------------------------


class LlamaCppModel:
    def __init__(self, llm):
        import llama_cpp

        self.runtime, self.llm = LlamaCpp.name, llm
        self.context_length = llm.n_ctx()
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog

    def encode(self, text: str, *, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=special, special=False)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")

    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        # llama-cpp-python's Llama evaluates one sequence at a time
        return [self.next_token_logprobs(seq).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0] for seq in sequences]

    def next_token_logprobs(self, ids: list[int]) -> torch.Tensor:
        self._check_fits(len(ids))
        self.llm.reset()
        self.llm.eval(ids)
        return torch.log_softmax(torch.from_numpy(self.llm.scores[: len(ids) - 1].copy()), dim=-1)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        self._check_fits(len(ids) + max_new_tokens)
        self.llm.reset()
        self.llm.eval(ids)
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            new.append(token)
            if self._is_eog(self._vocab, token):
                break
            self.llm.eval([token])
        return new

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        return [self.greedy(ids, budget) for ids, budget in zip(prompts, max_new_tokens, strict=True)]

    def _check_fits(self, length: int) -> None:
        if length > self.context_length:
            raise CannotEvaluate(f"{length} tokens do not fit llama.cpp's context of {self.context_length}")


class LlamaCpp:
    name = "llama.cpp"

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None) -> LlamaCppModel:
        from llama_cpp import Llama

        path = gguf_file(model_dir)
        try:
            with native_stderr():  # llama.cpp notes its cache layout on every load, verbose=False or not
                llm = Llama(model_path=str(path), n_ctx=min(_trained_context(path), LLAMA_CPP_MAX_CONTEXT), logits_all=True,
                            n_threads=torch.get_num_threads(), verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise CannotEvaluate(f"{path}: llama.cpp {version('llama_cpp_python')} can't load it ({exc})") from None
        return LlamaCppModel(llm)

    def versions(self) -> dict[str, str]:
        return {"llama_cpp_python": version("llama_cpp_python")}


def _trained_context(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"]
    key = f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length"
    field = reader.fields.get(key)
    return int(field.parts[field.data[0]][0]) if field else LLAMA_CPP_MAX_CONTEXT
