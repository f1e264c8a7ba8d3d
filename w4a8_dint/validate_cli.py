"""``w4a8 validate DIR``: the checkpoint contract (``w4a8_dint.contract.check``), every rule, one line out."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a w4a8-dint checkpoint directory")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow building a custom-code architecture (to check the tensors against it)")


def run(args: argparse.Namespace) -> int:
    from .contract import CheckpointError, check

    try:
        report = check(args.model_dir, trust_remote_code=args.trust_remote_code)
    except CheckpointError as e:
        print(f"invalid: {e}")
        return 1
    print(json.dumps({"valid": True, **report}))
    return 0
