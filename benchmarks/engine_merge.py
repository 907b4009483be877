"""merger's merge engine on a mergekit YAML config whose models are absolute directories, as mergekit-yaml takes
it: ``engine_merge.py CONFIG.yml OUT_DIR [--random-seed N] [--device cpu]``. Fails if the engine does not
support the config (the merge stage would hand it to mergekit)."""

import argparse
from pathlib import Path

import yaml

from merger.engine import execute, prepare
from merger.process import leave, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--random-seed", type=int)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    names = {config.get("base_model")} | {m["model"] for m in config.get("models", [])}
    plan = prepare(config, {name: Path(name) for name in names if name})
    execute(plan, args.out, seed=args.random_seed, device=args.device)


if __name__ == "__main__":
    start()  # as the merger CLI starts
    main()
    leave(0)  # as the merger CLI leaves
