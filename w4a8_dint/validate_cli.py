"""``w4a8 validate DIR``."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a w4a8-dint checkpoint directory")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, validate_checkpoint

    try:
        report = validate_checkpoint(args.model_dir)
    except CheckpointError as e:
        print(f"invalid: {e}")
        return 1
    print(json.dumps({"valid": True, **report}))
    return 0
