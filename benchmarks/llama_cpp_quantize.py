"""The peer for merger's GGUF quantize stage: llama.cpp's own tools, as users run them by hand.

    python benchmarks/llama_cpp_quantize.py CONVERTER MODEL_DIR OUT_FILE TYPE

CONVERTER is llama.cpp's convert_hf_to_gguf.py. Q8_0 (and F16/BF16) the converter writes itself; other
types are converted to BF16 first, then quantized by llama.cpp's quantizer (what llama-quantize runs).
"""

import subprocess
import sys
from pathlib import Path

import llama_cpp

DIRECT = {"Q8_0": "q8_0", "F16": "f16", "BF16": "bf16"}

converter, model_dir, out_file, gguf_type = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
out_file.parent.mkdir(parents=True, exist_ok=True)
converted = out_file if gguf_type in DIRECT else out_file.with_suffix(".bf16.gguf")
subprocess.run([sys.executable, converter, str(model_dir), "--outfile", str(converted), "--outtype",
                DIRECT.get(gguf_type, "bf16"), "--model-name", out_file.stem], check=True)
if gguf_type not in DIRECT:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    if llama_cpp.llama_model_quantize(str(converted).encode(), str(out_file).encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {converted} to {gguf_type}")
    converted.unlink()
