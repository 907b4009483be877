"""Write an English text for perplexity measurements: Python's own reference documentation (pydoc topics),
which every Python installation carries, cut to about eight 512-token windows."""

import sys
from pathlib import Path
from pydoc_data.topics import topics

CHARACTERS = 16_000

text = "\n\n".join(topics[name] for name in sorted(topics))[:CHARACTERS]
Path(sys.argv[1]).write_text(text, encoding="utf-8")
