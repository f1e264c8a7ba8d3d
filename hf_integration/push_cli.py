"""``w4a8 push DIR REPO_ID``: upload a checkpoint with a generated model card (``--dry-run`` shows the plan)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a w4a8-dint checkpoint directory")
    p.add_argument("repo_id", help="Hub repository, e.g. you/smollm2-135m-w4a8-dint")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the cached login)")
    p.add_argument("--base-model", default=None, help="base model id for the card's metadata")
    p.add_argument("--eval-results", default=None,
                   help="JSON from `w4a8 eval --json` (default: eval_results.json next to the weights, if any)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the files and card; upload nothing")


def run(args: argparse.Namespace) -> int:
    from w4a8_dint.contract import CheckpointError
    from w4a8_dint.hf_integration.hub import CARD_FILE, PushError, push_to_hub

    eval_results = None
    if args.eval_results:
        with open(args.eval_results, encoding="utf-8") as f:
            eval_results = json.load(f)
    try:
        plan = push_to_hub(args.model_dir, args.repo_id, token=args.token, private=args.private,
                           eval_results=eval_results, base_model=args.base_model, dry_run=args.dry_run)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"refusing to push: {e}")
        return 1
    except PushError as e:
        print(f"push failed: {e}")
        return 1
    files = sorted([*plan.files, CARD_FILE])
    if args.dry_run:
        print(f"dry run: would upload to {plan.repo_id} ({'private' if plan.private else 'public'}) in one commit:")
        for name in files:
            print(f"  {name}")
        print(f"\n----- {CARD_FILE} -----\n{plan.card}")
        return 0
    print(f"uploaded {len(files)} files to https://huggingface.co/{plan.repo_id}: {plan.extra.get('commit', '')}")
    return 0
