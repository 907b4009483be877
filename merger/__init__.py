"""merger: declarative model merging and adapter composition with content-hashed lineage."""

import os

# merger never downloads: Hub references resolve from the local cache only, and no library it drives
# (transformers, PEFT, mergekit) may reach for the network behind its back.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
