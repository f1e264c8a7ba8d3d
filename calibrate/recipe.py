"""The calibration recipe: one typed dataclass, validated up front (torchao-style config).

Every knob of ``w4a8 calibrate`` lives here with its default and the reason for it, so the
CLI, the Python API, the accuracy study and the tests all describe a run the same way, and
what ran is written into ``quantization_config.calibration``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from w4a8_dint.method_names import METHODS, ROUNDINGS
from w4a8_dint.formats import FLOAT_SCALES, FORMATS, PER_CHANNEL, SCALE_SCHEMES, TWO_LEVEL, DEFAULT_FORMAT
from w4a8_dint.reference import ACT_MODES

# AQAS / AWQ grid: alpha in {0, 0.05, ..., 1}. It is searched coarse-to-fine (0.1 steps, then the
# two 0.05 neighbours of the best): 13 evaluations per family instead of 21, and the same layer
# error as the full grid within noise in the ablation (docs/calibrate.md).
ALPHA_GRID: tuple[float, ...] = tuple(round(i / 20, 2) for i in range(21))
# Weight clip ratios (fraction of the group absmax kept), chosen per output channel.
CLIP_GRID: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# Scale families: "mean" = AWQ-shaped mean|X|^a / mean|W|^(1-a); "max" = SmoothQuant-shaped max|X|^a / max|W|^(1-a).
SCALE_FAMILIES: tuple[str, ...] = ("mean", "max")
# FPTQ layer policy bounds on max|X| (paper: v0 = 15, v1 = 150).
FPTQ_BOUNDS: tuple[float, float] = (15.0, 150.0)
PROPAGATION_MODES = ("quantized", "float")
# GPTQ's Hessian inputs: what the deployed kernel multiplies ("quantized": after the smoothing divisor
# and INT8 fake quantization) or the smoothed float inputs. "quantized" gave the lower W4A8 layer
# output error in the ablation (docs/calibrate.md, benchmarks/results/gptq_hessian_ablation.json).
GPTQ_HESSIAN_INPUTS = ("quantized", "float")
ALPHA_SEARCHES = ("coarse-to-fine", "full")
DEFAULT_SEQ_LEN = 512  # the language-modelling eval window; SLAC replaces it with the task's length


class RecipeError(ValueError):
    """A calibration setting that cannot work (caught before any model is loaded)."""


@dataclass
class CalibrationConfig:
    """What ``calibrate`` does. ``None`` fields are resolved per method (see :meth:`resolved`)."""

    method: str = "aqas"  # a name in the methods registry (calibrate/methods/)
    rounding: str = "rtn"  # weight rounding after the method's scales/clips: "rtn" or "gptq"
    format: str = DEFAULT_FORMAT
    # None -> the method's default (per channel; FPTQ: 128, or the largest of 128/64/32 dividing
    # every K, with a note). An explicit value is never changed.
    group_size: int | None = None
    # "float" group scales, or "two-level" (integer multiplier x per-channel float: one INT8 GEMM per
    # layer at run time; formats.quantize_two_level). Two-level needs an explicit group size.
    scale_scheme: str = FLOAT_SCALES
    act_mode: str = "per-token"  # fptq ignores it: its policy is chosen per layer
    dataset: str = "c4"
    samples: int = 32
    seq_len: int | None = None  # None -> SLAC length of target_task, or DEFAULT_SEQ_LEN
    target_task: str | None = None
    seed: int = 0
    # -- search (aqas / awq) ---------------------------------------------------------------
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    alpha_search: str = "coarse-to-fine"  # or "full": every grid point
    scale_families: tuple[str, ...] | None = None  # None -> the method's (aqas: ("mean", "max"); awq: ("mean",))
    clip_grid: tuple[float, ...] = CLIP_GRID
    # Tokens the search losses see: the first calibration batch holds about this many tokens
    # (whole sequences, because attention needs them). Statistics use every sample. 2048 gave
    # the same layer error within noise at twice the cost (ablation in docs/calibrate.md).
    search_tokens: int = 1024
    smoothquant_alpha: float = 0.5
    fptq_bounds: tuple[float, float] = FPTQ_BOUNDS
    # Layer i+1 is calibrated on layer i's *quantized* outputs (what it sees when deployed).
    propagate: str = "quantized"
    # -- GPTQ rounding (rounding="gptq") ---------------------------------------------------------
    gptq_hessian_inputs: str = "quantized"
    gptq_damp: float = 0.1  # fraction of mean(diag H) added to the diagonal (0.01 lost to RTN on real layers, see docs)
    gptq_block_size: int = 128  # columns per lazy-update block
    gptq_act_order: bool = False  # visit columns by decreasing diag(H); groups stay static and contiguous
    # -- scope / execution -----------------------------------------------------------------
    max_layers: int | None = None  # quantize only the first N decoder layers (tests, quick looks)
    device: str | None = None  # None -> "cuda" when available, else "cpu"
    # CPU intra-op threads for the run (None: torch's default). On a small shared CPU box one thread
    # can be much faster: the search runs many small ops whose thread synchronization dominates.
    num_threads: int | None = None
    trust_remote_code: bool = False
    modules_to_not_convert: tuple[str, ...] = ("lm_head",)
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.alpha_grid = tuple(float(a) for a in self.alpha_grid)
        self.clip_grid = tuple(float(c) for c in self.clip_grid)
        self.fptq_bounds = tuple(float(b) for b in self.fptq_bounds)  # type: ignore[assignment]
        self.modules_to_not_convert = tuple(self.modules_to_not_convert)
        if self.scale_families is not None:
            self.scale_families = tuple(self.scale_families)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise RecipeError(msg)

        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.rounding in ROUNDINGS, f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        need(self.scale_scheme in SCALE_SCHEMES, f"scale scheme must be one of {SCALE_SCHEMES}, got {self.scale_scheme!r}")
        need(self.scale_scheme != TWO_LEVEL or (self.group_size is not None and self.group_size != PER_CHANNEL),
             "two-level scales need an explicit group size (--group-size 64, say); per channel has one scale per row")
        need(self.format in FORMATS, f"format must be one of {tuple(FORMATS)}, got {self.format!r}")
        need(self.group_size is None or self.group_size == PER_CHANNEL or self.group_size > 0,
             f"group size must be a positive integer or -1 (per channel), got {self.group_size}")
        need(self.group_size is None or self.group_size == PER_CHANNEL or self.group_size % 2 == 0,
             f"group size must be even (codes are packed two per byte), got {self.group_size}")
        need(self.act_mode in ACT_MODES, f"act mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        need(self.samples >= 1, f"samples must be >= 1, got {self.samples}")
        need(self.seq_len is None or self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        need(self.seq_len is None or self.target_task is None,
             f"give either seq_len ({self.seq_len}) or target_task ({self.target_task!r}): SLAC derives the length from the task")
        need(self.search_tokens >= 1, f"search_tokens must be >= 1, got {self.search_tokens}")
        need(len(self.alpha_grid) > 0 and all(0.0 <= a <= 1.0 for a in self.alpha_grid),
             f"alpha grid values must lie in [0, 1], got {self.alpha_grid}")
        need(len(self.clip_grid) > 0 and all(0.0 < c <= 1.0 for c in self.clip_grid),
             f"clip ratios must lie in (0, 1], got {self.clip_grid}")
        need(self.scale_families is None or (len(self.scale_families) > 0 and set(self.scale_families) <= set(SCALE_FAMILIES)),
             f"scale families must be a non-empty subset of {SCALE_FAMILIES}, got {self.scale_families}")
        need(0.0 <= self.smoothquant_alpha <= 1.0, f"smoothquant alpha must lie in [0, 1], got {self.smoothquant_alpha}")
        lo, hi = self.fptq_bounds
        need(0 < lo <= hi, f"FPTQ bounds must satisfy 0 < v0 <= v1, got {self.fptq_bounds}")
        need(self.alpha_search in ALPHA_SEARCHES, f"alpha_search must be one of {ALPHA_SEARCHES}, got {self.alpha_search!r}")
        need(self.gptq_hessian_inputs in GPTQ_HESSIAN_INPUTS,
             f"gptq_hessian_inputs must be one of {GPTQ_HESSIAN_INPUTS}, got {self.gptq_hessian_inputs!r}")
        need(0.0 < self.gptq_damp < 1.0, f"gptq_damp must lie in (0, 1), got {self.gptq_damp}")
        need(self.gptq_block_size >= 1, f"gptq_block_size must be >= 1, got {self.gptq_block_size}")
        need(self.propagate in PROPAGATION_MODES, f"propagate must be one of {PROPAGATION_MODES}, got {self.propagate!r}")
        need(self.max_layers is None or self.max_layers >= 1, f"max_layers must be >= 1, got {self.max_layers}")
        need(self.num_threads is None or self.num_threads >= 1, f"num_threads must be >= 1, got {self.num_threads}")

    # -- method defaults (from the method's plug-in object) ---------------------------------------
    @property
    def method_impl(self):
        from .methods import get_method

        return get_method(self.method)

    @property
    def rounding_impl(self):
        from .methods import get_rounding

        return get_rounding(self.rounding).for_scale_scheme(self.scale_scheme)

    @property
    def families(self) -> tuple[str, ...]:
        if self.scale_families is not None:
            return self.scale_families
        return self.method_impl.scale_families

    @property
    def searches_scales(self) -> bool:
        return self.method_impl.searches_scales

    @property
    def loss_quantizes_activations(self) -> bool:
        """AQAS's point: the search loss sees INT8 activations; AWQ's loss is weight-only."""
        return self.method_impl.loss_quantizes_activations

    @property
    def needs_activations(self) -> bool:
        """False when neither the method nor the rounding uses activations: no calibration forward runs."""
        return self.method_impl.needs_activations(self) or self.rounding_impl.needs_hessian

    def to_record(self) -> dict[str, Any]:
        """The settings worth keeping in ``quantization_config.calibration`` (JSON-safe)."""
        d = asdict(self)
        for k in ("progress", "overwrite", "device", "trust_remote_code", "modules_to_not_convert", "num_threads"):
            d.pop(k)
        d["scale_families"] = list(self.families)
        for k in ("alpha_grid", "clip_grid", "fptq_bounds"):
            d[k] = list(d[k])
        from .methods import REGISTRY, ROUNDING_REGISTRY

        # keep only the method- and rounding-specific fields this run used
        own = set(self.method_impl.recipe_fields) | set(self.rounding_impl.recipe_fields)
        for impl in (*REGISTRY.values(), *ROUNDING_REGISTRY.values()):
            for k in impl.recipe_fields:
                if k not in own:
                    d.pop(k, None)
        return d


def resolve_group_size(cfg: CalibrationConfig, in_features: list[int], note: list[str] | None = None) -> int:
    """The group size the run uses; an explicit one is checked against every K, never changed."""
    from w4a8_dint.formats import resolve_group_size as check

    if cfg.group_size is None:
        return cfg.method_impl.default_group_size(in_features, note)
    for k in sorted(set(in_features)):
        check(k, cfg.group_size)  # raises FormatError naming K and the sizes that divide it
    return cfg.group_size


from .methods.fptq import fptq_group_size  # noqa: E402  (re-export; the rule lives with FPTQ)

__all__ = [
    "ALPHA_GRID", "CLIP_GRID", "SCALE_FAMILIES", "FPTQ_BOUNDS", "DEFAULT_SEQ_LEN", "CalibrationConfig",
    "RecipeError", "resolve_group_size", "fptq_group_size",
]
