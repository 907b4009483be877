"""merger: declarative model merging and adapter composition with content-hashed lineage."""

import logging
import os

# merger never downloads: Hub references resolve from the local cache only, and no library it drives
# (transformers, PEFT, mergekit) may reach for the network behind its back.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

# torchao (the int8 quantize format) warns on every import on a machine without CUDA about kernels it cannot
# load, and torch about a deprecated registration torchao makes: noise that says nothing about the user's work.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
