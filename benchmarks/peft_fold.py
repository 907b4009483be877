"""The peer for merger's adapter fold: PEFT's merge_and_unload, as users run it.

    python benchmarks/peft_fold.py BASE_DIR OUT_DIR ADAPTER_DIR [ADAPTER_DIR ...]

Loads the base in float32, loads every adapter, activates them all (merge_and_unload folds only the
active ones), folds, casts to the base's dtype and saves safetensors with the base's tokenizer.
"""

import shutil
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

base, out, adapters = Path(sys.argv[1]), Path(sys.argv[2]), [Path(a) for a in sys.argv[3:]]
dtype = AutoConfig.from_pretrained(base).dtype
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
for i, adapter in enumerate(adapters[1:], start=1):
    model.load_adapter(adapter, adapter_name=f"a{i}")
model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
merged = model.merge_and_unload()
merged.to(dtype).save_pretrained(out, safe_serialization=True)
for path in base.glob("tokenizer*"):
    shutil.copyfile(path, out / path.name)
