"""Reading model and adapter directories without loading weights: configs, safetensors and GGUF headers only.

Pickle-based weights (.bin .pt .pth .pkl .ckpt) can execute code when loaded, so a directory holding
any is refused by name; so is one that holds Python files or whose config names code of its own to import
(``auto_map``: it needs ``trust_remote_code``, which merger never grants).
A directory holding one ``.gguf`` file and no safetensors is a GGUF model (what the quantize stage writes); its
header is read, not its metadata values.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class ModelInfo:
    path: Path
    architecture: str | None = None
    model_type: str | None = None
    num_layers: int | None = None
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)
    is_adapter: bool = False
    adapter_config: dict | None = None
    gguf_file: Path | None = None  # set for a GGUF model directory


class ModelDirError(Exception):
    """A directory is not a usable model or adapter; the message names the file."""


def pickle_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def remote_code_configs(path: Path) -> list[str]:
    """The configs in ``path`` whose ``auto_map`` asks transformers to import the model's own code."""
    return [name for name in REMOTE_CODE_CONFIGS if (path / name).is_file() and _read_json(path / name).get("auto_map")]


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a .safetensors header."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ModelDirError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ModelDirError(f"{path}: safetensors header of {length} bytes is implausibly large")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            raise ModelDirError(f"{path}: not a safetensors file (header is not JSON)") from None
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def inspect_dir(path: Path, *, adapter: bool = False) -> ModelInfo:
    """Check a model (or PEFT adapter) directory and read what validation needs from it."""
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory")
    pickles = pickle_files(path)
    if pickles:
        names = ", ".join(str(p.relative_to(path)) for p in pickles[:5])
        raise ModelDirError(f"{path}: holds pickle files ({names}); only safetensors weights are accepted, convert them first")
    code = sorted(p.name for p in path.rglob("*.py"))
    if code:
        raise ModelDirError(f"{path}: holds Python code ({', '.join(code[:5])}); models that need remote code are refused")
    remote = remote_code_configs(path)
    if remote:
        raise ModelDirError(f"{path}: auto_map in {', '.join(remote)} names the model's own code to run; merger never runs remote code")
    shards = sorted(path.glob("*.safetensors"))
    ggufs = sorted(path.glob("*.gguf"))
    if not shards and len(ggufs) == 1 and not adapter:
        return _inspect_gguf(path, ggufs[0])
    if not shards:
        raise ModelDirError(f"{path}: holds no .safetensors weights")
    info = ModelInfo(path=path, is_adapter=adapter)
    for shard in shards:
        info.tensors.update(safetensors_header(shard))
    config_name = "adapter_config.json" if adapter else "config.json"
    config = _read_json(path / config_name)
    if adapter:
        info.adapter_config = config
    else:
        info.architecture = (config.get("architectures") or [None])[0]
        info.model_type = config.get("model_type")
        text_config = config.get("text_config") or {}
        info.num_layers = config.get("num_hidden_layers", text_config.get("num_hidden_layers"))
    return info


def _inspect_gguf(path: Path, gguf_file: Path) -> ModelInfo:
    from gguf import GGMLQuantizationType

    try:
        architecture, infos = gguf_header(gguf_file)
        tensors = {name: (GGMLQuantizationType(kind).name, shape) for name, (kind, shape) in infos.items()}
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{gguf_file}: not a readable GGUF file ({exc})") from None
    return ModelInfo(path=path, model_type=architecture, tensors=tensors, gguf_file=gguf_file)


GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # value type -> struct
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_header(path: Path) -> tuple[str | None, dict[str, tuple[int, tuple[int, ...]]]]:
    """A GGUF file's ``general.architecture`` and its tensors: name -> (ggml type, shape, outermost dimension
    first as in PyTorch). Reads the header only and skips every other metadata value (gguf's ``GGUFReader``
    builds numpy views of each, 25 s for Gemma 3's 262,144 vocabulary strings)."""
    import mmap

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError("no GGUF magic number")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} (merger reads 2 and later)")
        offset, architecture = 24, None

        def string() -> str:
            nonlocal offset
            (length,) = struct.unpack_from("<Q", data, offset)
            offset += 8 + length
            return data[offset - length:offset].decode("utf-8")

        def skip(kind: int) -> None:
            nonlocal offset
            if kind in GGUF_SCALARS:
                offset += struct.calcsize(GGUF_SCALARS[kind])
            elif kind == GGUF_STRING:
                (length,) = struct.unpack_from("<Q", data, offset)
                offset += 8 + length
            elif kind == GGUF_ARRAY:
                item, count = struct.unpack_from("<IQ", data, offset)
                offset += 12
                if item in GGUF_SCALARS:
                    offset += count * struct.calcsize(GGUF_SCALARS[item])
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"unknown metadata value type {kind}")

        for _ in range(kv_count):
            key = string()
            (kind,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if key == "general.architecture" and kind == GGUF_STRING:
                architecture = string()
            else:
                skip(kind)
        tensors = {}
        for _ in range(tensor_count):
            name = string()
            (dims,) = struct.unpack_from("<I", data, offset)
            shape = struct.unpack_from(f"<{dims}Q", data, offset + 4)
            (kind,) = struct.unpack_from("<I", data, offset + 4 + 8 * dims)
            offset += 4 + 8 * dims + 4 + 8  # dimensions, type, data offset
            tensors[name] = (kind, tuple(int(n) for n in reversed(shape)))
    return architecture, tensors


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelDirError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return value
