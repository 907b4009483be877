"""GGUF export with llama.cpp's own tools: its HF -> GGUF converter and its quantizer.

The converter (``convert_hf_to_gguf.py`` with its ``conversion`` package and ``gguf-py``) is not in any
wheel; it ships in the llama-cpp-python sdist. ``install_converter`` takes those three parts out of the
sdist of the installed llama-cpp-python version (from the package index, once per version), so converter
and quantizer always come from the same llama.cpp. The quantizer is ``llama_cpp.llama_model_quantize``.
"""

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

from merger.errors import MergerError

DISTRIBUTION = "llama-cpp-python"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# types the converter writes itself; every other type is quantized from a bf16 GGUF by llama.cpp
CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
# llama.cpp's "mostly" file types (llama.h enum llama_ftype); IQ* types need an importance matrix: not offered
LLAMA_FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}
GGUF_TYPES = tuple(LLAMA_FTYPES)
_TENSOR_LINE = re.compile(r"^INFO:hf-to-gguf:\S+,\s+torch\.\w+ --> ")
_REGISTERED = re.compile(r"@ModelBase\.register\(([^)]*)\)")


class GgufToolsMissing(MergerError):
    """llama-cpp-python or the converter taken from its sdist is not installed."""


@dataclass(frozen=True)
class Converter:
    script: Path
    llama_cpp_version: str

    def supported_architectures(self) -> frozenset[str]:
        """Architectures (config.json ``architectures[0]``) the converter has a class for."""
        names: set[str] = set()
        for source in [self.script, *sorted((self.script.parent / "conversion").glob("*.py"))]:
            for args in _REGISTERED.findall(source.read_text(encoding="utf-8")):
                names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
        return frozenset(names)


def llama_cpp_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        raise GgufToolsMissing(f"GGUF export needs {DISTRIBUTION}: pip install 'merger[gguf]'") from None


def converter_dir(tools_dir: Path) -> Path:
    return tools_dir / f"llama.cpp-{llama_cpp_version()}"


def find_converter(tools_dir: Path) -> Converter:
    home = converter_dir(tools_dir)
    script = home / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise GgufToolsMissing(f"llama.cpp's GGUF converter is not installed in {home}: run `merger setup-gguf`")
    return Converter(script, llama_cpp_version())


def install_converter(tools_dir: Path, say: Callable[[str], None] = print) -> Path:
    """Take the converter out of the llama-cpp-python sdist (same version as installed) into ``tools_dir``."""
    dest = converter_dir(tools_dir)
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    wanted = f"{DISTRIBUTION}=={llama_cpp_version()}"
    tools_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tools_dir) as tmp:
        say(f"downloading the {wanted} sdist (for llama.cpp's converter)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        wanted, "--dest", tmp], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if _converter_part(m.name)]
            tar.extractall(unpacked, members=members, filter="data")
        source = next(unpacked.glob("*/vendor/llama.cpp"))
        try:
            os.rename(source, dest)  # whole or not at all
        except OSError:
            if not (dest / "convert_hf_to_gguf.py").is_file():  # else another process installed it meanwhile
                raise
    say(f"llama.cpp converter installed in {dest}")
    return dest


def _converter_part(member: str) -> bool:
    _, _, inside = member.partition("/vendor/llama.cpp/")
    return bool(inside) and any(inside == part or (part.endswith("/") and inside.startswith(part)) for part in CONVERTER_PARTS)


def convert(converter: Converter, model_dir: Path, out_file: Path, outtype: str, *, name: str,
            on_tensor: Callable[[], None], should_cancel: Callable[[], bool]) -> None:
    """Run the converter on a safetensors model directory; ``on_tensor`` is called per tensor written."""
    cmd = [sys.executable, str(converter.script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype,
           "--model-name", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, not whatever gguf is installed
    tail: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            if _TENSOR_LINE.match(line):
                on_tensor()
            tail = (tail + [line.rstrip()])[-12:]
            if should_cancel():
                proc.terminate()
                proc.wait()
                return
        proc.wait()
    if proc.returncode != 0:
        raise MergerError(f"llama.cpp's converter failed (exit {proc.returncode}):\n" + "\n".join(tail))


def quantize(source: Path, dest: Path, gguf_type: str, threads: int) -> None:
    """llama.cpp's quantizer (the one llama-quantize runs) from a bf16/f16 GGUF to ``gguf_type``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[gguf_type]
    params.nthread = threads
    with native_stderr() as log:  # llama.cpp writes a line per tensor: kept for an error, not printed
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
        raise MergerError(f"llama.cpp could not quantize {source.name} to {gguf_type} (status {status}):\n{tail}")


@contextmanager
def native_stderr() -> Iterator[Path]:
    """Send what native code writes to file descriptor 2 into a temporary file for the duration."""
    with tempfile.NamedTemporaryFile(prefix="llama-cpp-", suffix=".log") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield Path(log.name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
