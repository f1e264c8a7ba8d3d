"""Calibration methods as plug-ins: ``name -> Method`` (see ``base.py`` for the hooks).

One module per method (``calibrate/methods/<name>.py`` defining ``METHOD``), loaded for every name
in ``w4a8_dint.method_names.METHODS`` -- the one list of names, kept in the core package because
checkpoint readers validate ``quantization_config.method`` without the calibrator. Adding a
method: write its module and add its name there. Nothing here imports torch (the CLI builds its
choices and help from this registry).
"""

from __future__ import annotations

from importlib import import_module

from w4a8_dint.method_names import METHODS, ROUNDINGS

from .base import GroupChoice, GroupContext, Method, SearchedScales
from .rounding import ROUNDING_REGISTRY, Rounding

REGISTRY: dict[str, Method] = {name: import_module(f"{__name__}.{name}").METHOD for name in METHODS}

if set(ROUNDING_REGISTRY) != set(ROUNDINGS):  # a name without an implementation (or the reverse)
    raise ImportError(f"rounding registry {sorted(ROUNDING_REGISTRY)} != w4a8_dint.method_names.ROUNDINGS {sorted(ROUNDINGS)}")


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown calibration method {name!r}; known: {', '.join(REGISTRY)}") from None


def get_rounding(name: str) -> Rounding:
    try:
        return ROUNDING_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown weight rounding {name!r}; known: {', '.join(ROUNDING_REGISTRY)}") from None


__all__ = ["REGISTRY", "ROUNDING_REGISTRY", "GroupChoice", "GroupContext", "Method", "Rounding", "SearchedScales",
           "get_method", "get_rounding",
           "methods_table", "roundings_table"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def methods_table() -> str:
    """The docs' method table (docs/calibrate.md), generated from the registry (a test keeps them equal)."""
    rows = [f"| `{n}` | {_cell(m.summary)} | {'yes' if m.searches_scales else 'no'} |" for n, m in REGISTRY.items()]
    return "\n".join(["| `--method` | what it does | searches scales + clips |", "|---|---|---|", *rows])


def roundings_table() -> str:
    rows = [f"| `{n}` | {_cell(r.summary)} |" for n, r in ROUNDING_REGISTRY.items()]
    return "\n".join(["| `--rounding` | what it does |", "|---|---|", *rows])
