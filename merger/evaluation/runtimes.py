"""Runtimes: what loads a model directory for scoring, and what it can do once loaded.

A runtime has a ``name`` (shown in result tables) and ``load(model_dir, dtype=..., tokenizer_dir=..., device=...)``
returning a ``LoadedModel``: encode, decode, per-token log-probabilities of token sequences and greedy
continuation. The metrics use only that, so every runtime is measured by the same code.

- ``transformers``: a safetensors Hugging Face directory.
- ``llama.cpp`` (llama-cpp-python, when importable) and ``transformers-gguf`` (transformers
  ``gguf_file=``, dequantized): a directory holding exactly one ``*.gguf`` file, as the quantize stage
  stores it. transformers-gguf takes the tokenizer from the GGUF, or, when transformers can't read it,
  from ``tokenizer_dir`` (the unquantized source).
"""

import importlib.util
import json
import time
from collections.abc import Callable, Container
from contextlib import contextmanager
from functools import cache, cached_property, partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from merger import devices
from merger.errors import MergerError
from merger.gguf_tools import native_stderr
from merger.hashing import digest_json, sha256_file

if TYPE_CHECKING:
    import numpy as np

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_DTYPE = "float32"  # what transformers dequantizes a GGUF file to, unless told otherwise
LOGITS_BUDGET_BYTES = 1 << 30  # float32 logits one transformers forward pass or llama.cpp decode may hold
LLAMA_CPP_MAX_CONTEXT = 4096  # llama.cpp's KV cache, shared by a decode's sequences; one sequence is also capped at the model's trained context
LLAMA_CPP_SEQUENCES = 64  # sequences one llama.cpp decode takes at most (the context's n_seq_max)
# Logits rows reduced together: 16 MB of float32 with a 262,144-token vocabulary, so that glibc's malloc serves their
# temporaries from its heap (above 32 MiB it maps fresh pages for each, and the page faults took more time than the math)
BLOCK_ROWS = 16
HEAD_ROWS = 8 * BLOCK_ROWS  # rows the output layer computes at once (its weights, 0.7 GB for Gemma 3 270M, read once per block)
PROBE_SHAPE = (512, 1024, 2048)  # rows × inputs × outputs of the matrix product timed to choose a CPU's dtype


Settled = Callable[[int, list[int]], bool]
Rows = Callable[[int, int], torch.Tensor]  # rows(start, stop): float32 logits of those positions, (stop - start) × vocabulary


class CannotEvaluate(MergerError):
    """A model that a runtime cannot load or run; the message says which and why."""


class LoadedModel(Protocol):
    runtime: str
    context_length: int
    decodes_by_appending: bool  # decoding more tokens only appends text (no clean-up that rewrites what came before)

    def encode(self, text: str, *, special: bool) -> list[int]:
        """Token ids; ``special``: add special tokens (BOS) as the model's tokenizer does."""

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped."""

    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """For each sequence, log p(token[t] | tokens[:t]) for t = 1..len-1 (float32)."""

    def next_token_logits(self, ids: list[int]) -> Rows:
        """The logits of the token after each of ``ids[:-1]``, handed out a block of rows at a time (a whole
        window's are len × vocabulary floats): ``rows(start, stop)``, valid until this model's next call."""

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``ids``: at most ``max_new_tokens``, ending at an end-of-sequence token."""

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: list[int], *, guesses: list[list[int]] | None = None,
                     settled: Settled | None = None) -> list[list[int]]:
        """``greedy`` of each prompt with its own budget, computed together where the runtime can.

        ``guesses``: a likely continuation of each prompt (a task's answer). One forward pass over prompt +
        guess confirms every guessed token greedy decoding would pick, and gives the first one it would not:
        a right guess costs one pass instead of one per token. ``settled(row, tokens)``: true once the
        caller needs no more of that row (a prefix of its greedy continuation is returned).
        """


class Runtime(Protocol):
    name: str

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None, device: str = "cpu") -> LoadedModel: ...

    def versions(self) -> dict[str, str]: ...


def evaluation_threads():
    """torch's thread count while evaluating: the cores idle now (``devices.idle_cores``)."""
    return devices.torch_threads(devices.idle_cores())


def adapt_threads() -> None:
    """Set torch's thread count to the cores idle now (``evaluation_threads`` calls it again between batches:
    the load changes while an evaluation runs)."""
    torch.set_num_threads(devices.idle_cores())


def gguf_file(model_dir: Path) -> Path | None:
    """The one ``*.gguf`` file of a GGUF model directory; None for other directories."""
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) > 1:
        raise CannotEvaluate(f"{model_dir}: holds {len(files)} .gguf files; a GGUF model directory holds exactly one")
    return files[0] if files else None


def stored_dtype(model_dir: Path) -> str:
    """The dtype a model's weights are stored in, as its config.json says (float32 for a GGUF file, which
    transformers dequantizes, and when the config names none merger runs in)."""
    if gguf_file(model_dir) is not None:
        return GGUF_DTYPE
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    named = config.get("dtype") or config.get("torch_dtype")
    return named if named in DTYPES else "float32"


def auto_dtype(model_dir: Path, device: str = "cpu") -> str:
    """What ``dtype: auto`` runs a model in under transformers: as stored where the device multiplies that
    dtype's matrices natively (a GPU; bfloat16 from compute capability 8) or, on a CPU, faster than float32
    ones; else float32. A CPU's flags don't tell: with AVX512-BF16, a 512-token Gemma 3 270M forward pass in
    bfloat16 took 2.0-2.6 s against 1.4 s in float32 on a Xeon, and 3x less time than float32 on an AMD EPYC."""
    stored = stored_dtype(model_dir)
    if device != "cpu":
        native = stored != "bfloat16" or torch.cuda.is_bf16_supported()
    else:
        native = stored == "float32" or faster_than_float32(stored)
    return stored if native else "float32"


@cache
def faster_than_float32(dtype: str) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices faster than float32 ones: one product of PROBE_SHAPE in
    each, timed three times in turn (the best of each; after a first call that picks the kernel), once per process."""
    products = [_product(DTYPES[dtype]), _product(torch.float32)]
    rounds = [[_seconds(product) for product in products] for _ in range(3)]
    half, full = (min(times) for times in zip(*rounds))
    return half < full


def _product(dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    rows, inputs, outputs = PROBE_SHAPE
    product = partial(torch.nn.functional.linear, torch.randn(rows, inputs).to(dtype), torch.randn(outputs, inputs).to(dtype))
    product()
    return product


def _seconds(product: Callable[[], torch.Tensor]) -> float:
    started = time.perf_counter()
    product()
    return time.perf_counter() - started


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
        self.device = model.device
        self.context_length = getattr(model.config, "max_position_embeddings", None) or 2048
        self.decodes_by_appending = not getattr(tokenizer, "clean_up_tokenization_spaces", False)

    def encode(self, text: str, *, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        if self._head is not None:  # the body once, the output layer on a block of rows at a time
            return self._logprobs(sequences)
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
        rows = self._rows(ids.to(self.device), mask.to(self.device))
        return [token_logprobs(partial(rows, row), seq) for row, seq in enumerate(sequences)]

    def next_token_logits(self, ids: list[int]) -> Rows:
        return partial(self._rows(torch.tensor([ids], device=self.device), None), 0)

    @torch.inference_mode()
    def _rows(self, ids: torch.Tensor, mask: torch.Tensor | None) -> Callable[[int, int, int], torch.Tensor]:
        """``rows(sequence, start, stop)``: float32 logits at those positions of one of ``ids``' sequences."""
        if self._head is None:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            return lambda row, start, stop: logits[row, start:stop].float()
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        computed = {}  # the output layer's last block: (sequence, first position) -> logits

        def rows(row: int, start: int, stop: int) -> torch.Tensor:
            first = start - start % HEAD_ROWS  # blocks of HEAD_ROWS positions, each computed once
            if stop > first + HEAD_ROWS:  # across blocks: those rows alone
                return self._head(hidden[row, start:stop]).float()
            if (row, first) not in computed:
                computed.clear()
                computed[row, first] = self._head(hidden[row, first:first + HEAD_ROWS]).float()
            return computed[row, first][start - first:stop - first]

        return rows

    @cached_property
    def _head(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._split_head()

    def _split_head(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The output layer alone, run on the decoder's last hidden states: the output embeddings, then Gemma's
        final soft-capping where the config has one. None unless that gives exactly the model's logits (on a few
        tokens, now): then only whole forward passes are used."""
        head, cap = self.model.get_output_embeddings(), getattr(self.model.config, "final_logit_softcapping", None)

        @torch.inference_mode()
        def run(hidden: torch.Tensor) -> torch.Tensor:
            logits = head(hidden)
            return logits if cap is None else torch.tanh(logits / cap) * cap

        probe = torch.tensor([[self._pad(), 1, 2, 3]], device=self.device) % self.model.config.vocab_size
        with torch.inference_mode():
            try:
                hidden = self.model.get_decoder()(input_ids=probe).last_hidden_state
            except (AttributeError, TypeError, ValueError):  # no decoder of that shape
                return None
            return run if torch.equal(run(hidden), self.model(input_ids=probe).logits) else None

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return self.greedy_batch([ids], [max_new_tokens])[0]

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: list[int], *, guesses: list[list[int]] | None = None,
                     settled: Settled | None = None) -> list[list[int]]:
        settled = settled or _never
        eos = self._eos()
        found = self._confirm(prompts, max_new_tokens, guesses, eos) if guesses else [[] for _ in prompts]
        rest = [row for row, tokens in enumerate(found)
                if not _finished(tokens, max_new_tokens[row], eos) and not (tokens and settled(row, tokens))]
        if rest:
            more = self._generate([prompts[row] + found[row] for row in rest], [max_new_tokens[row] - len(found[row]) for row in rest],
                                  lambda i, tokens: settled(rest[i], found[rest[i]] + tokens), eos)
            for row, tokens in zip(rest, more, strict=True):
                found[row] = found[row] + tokens
        return found

    def _eos(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _pad(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _left_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask, left-padded: every sequence ends in the last column."""
        longest = max(map(len, sequences))
        ids = torch.full((len(sequences), longest), self._pad(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, longest - len(seq):] = torch.tensor(seq)
            mask[row, longest - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _confirm(self, prompts: list[list[int]], budgets: list[int], guesses: list[list[int]], eos: set[int]) -> list[list[int]]:
        """The start of each greedy continuation that one pass over prompt + guess gives: the guessed tokens
        greedy decoding agrees with, then the token it picks instead (or after the whole guess)."""
        guesses = [guess[:max(budget - 1, 0)] for guess, budget in zip(guesses, budgets, strict=True)]
        vocabulary = self.model.get_output_embeddings().weight.shape[0]
        per_pass = max(1, LOGITS_BUDGET_BYTES // ((max(map(len, guesses)) + 1) * vocabulary * 4))
        found = []
        for start in range(0, len(prompts), per_pass):
            chunk = slice(start, start + per_pass)
            picks = self._last_picks([p + g for p, g in zip(prompts[chunk], guesses[chunk])], max(map(len, guesses[chunk])) + 1)
            for row, (guess, budget) in enumerate(zip(guesses[chunk], budgets[chunk])):
                predicted = picks[row][len(picks[row]) - len(guess) - 1:]  # after the prompt, then after each guessed token
                agreed = next((i for i, (g, p) in enumerate(zip(guess, predicted)) if g != p), len(guess))
                found.append(_through_first(predicted[:min(agreed + 1, budget)], eos))
        return found

    @torch.inference_mode()
    def _last_picks(self, sequences: list[list[int]], keep: int) -> list[list[int]]:
        """The most likely next token at each of the last ``keep`` positions of each (left-padded) sequence;
        the output layer runs on those positions only."""
        ids, mask = self._left_padded(sequences)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        return logits[:, -keep:].argmax(-1).tolist()

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], budgets: list[int], settled: Settled, eos: set[int]) -> list[list[int]]:
        from transformers import StoppingCriteriaList

        ids, mask = self._left_padded(prompts)
        done = _Done(ids.shape[1], budgets, settled, eos)
        self.model.generate(ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=False,
                            pad_token_id=self._pad(), stopping_criteria=StoppingCriteriaList([done]))
        return done.tokens


class _Done:
    """A stopping criterion: a sequence is done at its own number of new tokens, at an end-of-sequence token, or
    once ``settled``; ``tokens`` keeps each sequence's new tokens up to there (what follows in a batch is padding)."""

    def __init__(self, prompt_length: int, budgets: list[int], settled: Settled, eos: set[int]):
        self.prompt_length, self.budgets, self.settled, self.eos = prompt_length, budgets, settled, eos
        self.tokens: list[list[int]] = [[] for _ in budgets]
        self.finished = [False] * len(budgets)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row, new in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if not self.finished[row]:
                self.tokens[row] = new
                self.finished[row] = _finished(new, self.budgets[row], self.eos) or self.settled(row, new)
        return torch.tensor(self.finished, device=input_ids.device)


def token_logprobs(rows: Rows, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..len-1 from a sequence's logits, a block of rows at a time."""
    picked = []
    for start in range(0, len(ids) - 1, BLOCK_ROWS):
        logits = rows(start, min(start + BLOCK_ROWS, len(ids) - 1))
        targets = torch.tensor(ids[start + 1:start + 1 + len(logits)], device=logits.device)[:, None]
        picked.append(logits.gather(-1, targets)[:, 0] - logits.logsumexp(-1))
    return torch.cat(picked).cpu()


def _never(row: int, tokens: list[int]) -> bool:
    return False


def _finished(tokens: list[int], budget: int, stops: Container[int]) -> bool:
    return len(tokens) >= budget or bool(tokens) and tokens[-1] in stops


def _through_first(tokens: list[int], stops: Container[int]) -> list[int]:
    """``tokens`` up to and including the first of ``stops``."""
    return next((tokens[: i + 1] for i, token in enumerate(tokens) if token in stops), tokens)


class Transformers:
    name = "transformers"

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None, device: str = "cpu") -> HFModel:
        from transformers import AutoModelForCausalLM

        model = _loading(model_dir, lambda: AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False))
        tokenizer = _loading(model_dir, lambda: _shared_tokenizer(model_dir))
        return HFModel(self.name, model.to(device), tokenizer)

    def versions(self) -> dict[str, str]:
        return {"transformers": version("transformers"), "torch": version("torch")}


# what AutoTokenizer reads besides config.json's model type
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")


def _tokenizer_key(model_dir: Path) -> str:
    """The digest of what a directory's tokenizer is made of."""
    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        model_type = None
    return digest_json({"model_type": model_type,
                        "files": {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}})


_tokenizers: dict[str, object] = {}  # by _tokenizer_key: the last few loaded


def _shared_tokenizer(model_dir: Path):
    """One tokenizer for every directory with the same tokenizer files (loading Gemma 3's took about 4 s; a merge,
    its parents and a quantized model's source carry the same ones). Shared: callers must not change it."""
    from transformers import AutoTokenizer

    key = _tokenizer_key(model_dir)
    if key not in _tokenizers:
        if len(_tokenizers) >= 4:
            del _tokenizers[next(iter(_tokenizers))]
        _tokenizers[key] = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return _tokenizers[key]


class TransformersGGUF(Transformers):
    name = "transformers-gguf"

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None, device: str = "cpu") -> HFModel:
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
            tokenizer = _loading(tokenizer_dir, lambda: _shared_tokenizer(tokenizer_dir))
        return HFModel(self.name, model.to(device), tokenizer)

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
    """A llama.cpp model, decoded through llama.cpp's batch API: several sequences in one decode, each its own
    sequence in one KV cache they share; logits only at the positions asked for, read in place from llama.cpp's
    buffer (llama-cpp-python's ``Llama.eval`` keeps every position's and copies them)."""

    def __init__(self, model, context):
        import llama_cpp

        self.runtime, self._model, self._context = LlamaCpp.name, model, context
        self._cells = llama_cpp.llama_n_ctx(context.ctx)  # the KV cache all sequences of a decode share
        self._sequences = llama_cpp.llama_n_seq_max(context.ctx)
        self.context_length = min(self._cells, model.n_ctx_train())  # one sequence's positions
        self.decodes_by_appending = True
        self._vocabulary = model.n_vocab()
        self._ends = _EndOfGeneration(model.vocab)
        self._batch = llama_cpp.llama_batch_init(self._cells, 0, 1)
        self._free_batch = llama_cpp.llama_batch_free

    def __del__(self):
        self._free_batch(self._batch)
        # the context, then the model: llama-cpp-python's two refer to each other, so that without this only the
        # garbage collector would free them (3 loads of Gemma 3 270M Q8_0 held 5.5 GB until it ran)
        self._model.close()

    def encode(self, text: str, *, special: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=special, special=False)

    def decode(self, ids: list[int]) -> str:
        return self._model.detokenize(ids, special=False).decode("utf-8", errors="replace")

    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        for seq in sequences:
            self._check_fits(len(seq))
        found = []
        for pack in self._packs([len(seq) for seq in sequences], [len(seq) - 1 for seq in sequences]):
            self._context.kv_cache_clear()
            logits = torch.from_numpy(self._decode([(s, sequences[i], 0, range(len(sequences[i]) - 1)) for s, i in enumerate(pack)]))
            first = 0
            for i in pack:
                rows = logits[first:first + len(sequences[i]) - 1]
                found.append(token_logprobs(lambda start, stop, rows=rows: rows[start:stop], sequences[i]))
                first += len(rows)
        return found

    def next_token_logits(self, ids: list[int]) -> Rows:
        self._check_fits(len(ids))
        self._context.kv_cache_clear()
        logits = torch.from_numpy(self._decode([(0, ids, 0, range(len(ids) - 1))]))
        return lambda start, stop: logits[start:stop]

    def _packs(self, cells: list[int], outputs: list[int]) -> list[range]:
        """Consecutive sequences decoded together: at most the context's sequences, their ``cells`` (tokens the
        cache holds) within the KV cache, their ``outputs`` (logits rows) within LOGITS_BUDGET_BYTES; a
        sequence alone may exceed that budget."""
        packs, start, held, rows = [], 0, 0, 0
        for i, (need, scored) in enumerate(zip(cells, outputs, strict=True)):
            if i > start and (i - start == self._sequences or held + need > self._cells
                              or (rows + scored) * self._vocabulary * 4 > LOGITS_BUDGET_BYTES):
                packs.append(range(start, i))
                start, held, rows = i, 0, 0
            held, rows = held + need, rows + scored
        return packs + [range(start, len(cells))] if cells else packs

    def _decode(self, pieces: list[tuple[int, list[int], int, range]]) -> "np.ndarray":
        """Run each piece — (sequence id, tokens, first position, outputs) — in one decode; the cache keeps each
        sequence's earlier positions. The logits after the tokens at each piece's ``outputs`` (indices into its
        tokens), piece after piece: outputs × vocabulary, a view of llama.cpp's buffer, valid until the next decode."""
        import llama_cpp
        import numpy as np

        threads = torch.get_num_threads()  # what evaluation_threads chose last: the cores idle now
        llama_cpp.llama_set_n_threads(self._context.ctx, threads, threads)  # n_threads_batch: every multi-token decode
        batch, n = self._batch, 0
        for seq, tokens, position, outputs in pieces:
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.seq_id[n][0] = token, position + i, 1, seq
                batch.logits[n] = i in outputs
                n += 1
        batch.n_tokens = n
        if llama_cpp.llama_decode(self._context.ctx, batch) != 0:
            raise CannotEvaluate(f"llama.cpp could not decode {n} tokens of {len(pieces)} sequences")
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._context.ctx),
                                     shape=(sum(len(outputs) for *_, outputs in pieces), self._vocabulary))

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return self.greedy_batch([ids], [max_new_tokens])[0]

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: list[int], *, guesses: list[list[int]] | None = None,
                     settled: Settled | None = None) -> list[list[int]]:
        settled = settled or _never
        guesses = guesses or [[] for _ in prompts]
        for prompt, budget in zip(prompts, max_new_tokens, strict=True):
            self._check_fits(len(prompt) + budget)
        found = []
        for pack in self._packs([len(prompts[i]) + max_new_tokens[i] for i in range(len(prompts))],
                                [min(len(guesses[i]), max(max_new_tokens[i] - 1, 0)) + 1 for i in range(len(prompts))]):
            found += self._greedy([prompts[i] for i in pack], [max_new_tokens[i] for i in pack], [guesses[i] for i in pack],
                                  lambda s, tokens, pack=pack: settled(pack[s], tokens))
        return found

    def _greedy(self, prompts: list[list[int]], budgets: list[int], guesses: list[list[int]], settled: Settled) -> list[list[int]]:
        """Greedy continuations of prompts that fit the cache together, each its own sequence: one decode over
        every prompt + guess (logits after the prompt and after each guessed token only), then one decode per
        step of a token of each sequence still running; each stops at its own budget, end of generation or
        ``settled``."""
        self._context.kv_cache_clear()
        guesses = [guess[:max(budget - 1, 0)] for guess, budget in zip(guesses, budgets, strict=True)]
        logits = self._decode([(s, prompt + guess, 0, range(len(prompt) - 1, len(prompt) + len(guess)))
                               for s, (prompt, guess) in enumerate(zip(prompts, guesses))])
        predicted, first = logits.argmax(-1).tolist(), 0
        found, running = [], []
        for s, (prompt, guess, budget) in enumerate(zip(prompts, guesses, budgets)):
            picks, first = predicted[first:first + len(guess) + 1], first + len(guess) + 1
            agreed = next((i for i, (g, p) in enumerate(zip(guess, picks)) if g != p), len(guess))
            new = picks[:min(agreed + 1, budget)]
            new = _through_first(new, self._ends)
            found.append(new)
            if new and not _finished(new, budget, self._ends) and not settled(s, new):
                # the cache keeps the prompt and the agreed tokens; the guess's rejected tail is dropped
                self._context.kv_cache_seq_rm(s, len(prompt) + len(new) - 1, -1)
                running.append(s)
        while running:
            steps = self._decode([(s, found[s][-1:], len(prompts[s]) + len(found[s]) - 1, range(1)) for s in running])
            for s, token in zip(running, steps.argmax(-1).tolist(), strict=True):
                found[s].append(token)
            running = [s for s in running if not _finished(found[s], budgets[s], self._ends) and not settled(s, found[s])]
        return found

    def _check_fits(self, length: int) -> None:
        if length > self.context_length:
            raise CannotEvaluate(f"{length} tokens do not fit llama.cpp's context of {self.context_length}")


class _EndOfGeneration:
    """A llama.cpp vocabulary's end-of-generation tokens as a container (``token in stops``), as ``_finished`` and
    ``_through_first`` take stop tokens (llama.cpp answers per token; it lists no set)."""

    def __init__(self, vocab):
        import llama_cpp

        self._vocab, self._is_eog = vocab, llama_cpp.llama_vocab_is_eog

    def __contains__(self, token: object) -> bool:
        return isinstance(token, int) and bool(self._is_eog(self._vocab, token))


class LlamaCpp:
    name = "llama.cpp"

    def load(self, model_dir: Path, *, dtype: str, tokenizer_dir: Path | None = None, device: str = "cpu") -> LlamaCppModel:
        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        # what llama-cpp-python's Llama is built of: Llama sets the context's n_seq_max for embedding models only
        path = gguf_file(model_dir)
        set_verbose(False)  # llama.cpp's log, as Llama(verbose=False) quiets it
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0 if device == "cpu" else 0x7FFFFFFF  # every layer (how Llama passes -1)
        context_params = llama_cpp.llama_context_default_params()
        # one decode takes every sequence that fits the cache (llama.cpp splits it into micro-batches of n_ubatch);
        # one cache for all sequences (a sequence's tokens attend to its own only), full-size for sliding-window
        # layers (swa_full, the default), attention without flash attention (as llama-cpp-python's Llama runs it)
        context_params.n_ctx = context_params.n_batch = LLAMA_CPP_MAX_CONTEXT
        context_params.n_ubatch = 512
        context_params.n_seq_max, context_params.kv_unified = LLAMA_CPP_SEQUENCES, True
        context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        try:
            with native_stderr():  # llama.cpp notes its cache layout on every load, verbose=False or not
                model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
                context = _internals.LlamaContext(model=model, params=context_params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise CannotEvaluate(f"{path}: llama.cpp {version('llama_cpp_python')} can't load it ({exc})") from None
        return LlamaCppModel(model, context)

    def versions(self) -> dict[str, str]:
        return {"llama_cpp_python": version("llama_cpp_python")}
