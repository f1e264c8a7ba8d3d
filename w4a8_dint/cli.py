"""``w4a8`` console script: one entry point, one subcommand per job.

Each subcommand lives next to the code it drives (``<subpackage>/cli.py``) and
exposes ``add_arguments(parser)`` and ``run(args) -> int``. Those modules import
nothing heavy at module level, so ``w4a8 --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "calibrate": ("w4a8_dint.calibrate.cli", "quantize a model (AQAS+SLAC, FPTQ, AWQ, SmoothQuant, RTN) to a w4a8-dint checkpoint"),
    "eval": ("w4a8_dint.hf_integration.eval_cli", "perplexity (PTB, C4) and zero-shot accuracy of a float or quantized model"),
    "validate": ("w4a8_dint.validate_cli", "check a w4a8-dint checkpoint (config, shards, shapes, dtypes)"),
    "push": ("w4a8_dint.hf_integration.push_cli", "upload a quantized checkpoint with a generated model card to the Hub"),
    "hw-report": ("w4a8_dint.hw_model.cli", "MAC-unit area/energy (synthesized RTL) and per-model savings"),
    "demo": ("w4a8_dint.demo", "end to end on the embedded model: calibrate -> evaluate -> serve one completion -> hardware report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w4a8", description="W4A8 post-training quantization with dINT4 weights.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"w4a8-dint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
