"""Third-party noise kept off the terminal: what merger's libraries print on their own (progress bars,
deprecation and library-load warnings, info logs) says nothing about the user's work, and would
interleave with merger's own progress. ``merger --verbose`` leaves all of it on.
"""

import logging
import os
import warnings

# not celery or kombu: a worker's log (ready, received, succeeded) is the service's own record
LIBRARIES = ("torch", "torchao", "transformers", "peft", "mergekit", "huggingface_hub", "datasets", "lm_eval",
             "accelerate", "gguf", "httpx", "optuna")


def silence_libraries() -> None:
    """Before the libraries are imported: no progress bars, warnings or logs below ERROR from them."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # mergekit's shard bars, transformers' and lm-eval's bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"merger(\.|$)")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
