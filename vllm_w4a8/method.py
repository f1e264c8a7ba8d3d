"""The vLLM quantization method ``w4a8-dint``: config, linear method, parameters.

Registered on import (``plugin.register`` imports this module in every vLLM
process). Classes live at module level because vLLM pickles the config to the
engine and worker processes.

Checkpoint -> vLLM mapping (names from ``w4a8_dint.config``): for every HF linear
``<prefix>`` the checkpoint holds ``qweight`` uint8 [N, K/2], ``weight_scale``
f32 [N, K/G] (or [N, 1] per channel), optionally ``input_scale`` f32 [1]
(per-tensor static layers) and ``smooth_scale`` f32 [K]. vLLM fuses q/k/v and
gate/up into one layer; their HF parts are found through the model's
``packed_modules_mapping`` and must agree on everything that acts on the shared
input (activation mode, static scale, smoothing vector), since one activation
quantization feeds the fused GEMM. Two-level checkpoints (``scale_scheme:
"two-level"``) hold a per-channel ``weight_scale`` f32 [N, 1] and
``weight_group_mult`` u8 [N, ceil(K/G / 2)] (two 4-bit multipliers per byte).

Tensor parallel: ``qweight`` and ``weight_scale`` shard like any packed GPTQ-style
weight (output dim for column layers, input dim for row layers; the packing is
along K, so the loader's K offsets are already in bytes). A group must not
straddle two ranks. ``smooth_scale`` is an input-dim vector: replicated for
column layers, sliced along K for row layers. ``weight_group_mult`` shards like
float group scales (rows along N, packed bytes along K); a row-parallel rank
must hold an even number of groups so no byte straddles two ranks. The
per-channel two-level ``weight_scale`` shards along N only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)

from w4a8_dint import contract
from w4a8_dint.checkpoint import CheckpointError
from w4a8_dint.config import (
    INPUT_SCALE,
    QUANT_METHOD,
    QWEIGHT,
    SMOOTH_SCALE,
    WEIGHT_GROUP_MULT,
    WEIGHT_SCALE,
    ConfigError,
    LayerPolicy,
    W4A8Config,
)
from w4a8_dint.formats import PER_CHANNEL, packed_group_mult_shape, resolve_group_size
from w4a8_dint.kernels.linear import W4A8LayerSpec, choose_kernel

# Under vLLM's logger namespace so its handler, format and VLLM_LOGGING_LEVEL apply (a logger
# outside "vllm." is not configured by vLLM and its INFO lines would be dropped).
logger = init_logger("vllm.w4a8_dint")

# Force a kernel by name (e.g. "reference", "cpu-int8", "onednn-int8"); read once in the
# front-end process and shipped to the workers inside the pickled config.
KERNEL_ENV = "W4A8_DINT_VLLM_KERNEL"
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}
_logged: set[tuple] = set()


def _log_once(key: tuple, msg: str, *args: Any, warning: bool = False) -> None:
    if key in _logged:
        return
    _logged.add(key)
    (logger.warning if warning else logger.info)(msg, *args)


def _shard_index(shard_id: Any) -> int:
    if shard_id is None:
        return 0
    if isinstance(shard_id, str):
        return _QKV_INDEX[shard_id]
    return int(shard_id)


def _tp_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """Max of per-token absmax over the TP group: ``[M, 1]`` -> ``[M, 1]`` (all-gather then max)."""
    return tensor_model_parallel_all_gather(absmax.contiguous(), dim=-1).amax(dim=-1, keepdim=True)


def logical_output_sizes(layer: LinearBase) -> list[int]:
    """Full (unsharded) output size of each HF part a vLLM layer fuses, in shard order."""
    if isinstance(layer, QKVParallelLinear):
        v_head = getattr(layer, "v_head_size", layer.head_size)
        return [layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size,
                layer.total_num_kv_heads * v_head]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(layer.output_sizes)
    return [layer.output_size]


class SmoothScaleParameter(BasevLLMParameter):
    """The smoothing vector of a layer's input, one row per fused HF part: ``[parts, K_local]``.

    Fused parts share one input, so after loading every row must be the same
    vector (checked in ``process_weights_after_loading``). Row-parallel layers
    keep only this rank's slice of K.
    """

    def _load_row(self, row: int, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != tuple(self.data.shape[1:]):
            raise CheckpointError(
                f"{SMOOTH_SCALE}: expected [{self.data.shape[1]}] for this rank, got {tuple(loaded.shape)}"
            )
        self.data[row].copy_(loaded)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load_row(0, loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        self._load_row(_shard_index(kwargs.get("shard_id")), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        self._load_row(_shard_index(kwargs.get("shard_id")), loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        k = self.data.shape[1]
        self._load_row(0, loaded_weight.narrow(0, self.tp_rank * k, k))


class _CheckedLoader:
    """Wraps a layer's weight loader: checks dtype / shape / values of each checkpoint tensor first.

    The front-end validation (``validation.validate_for_serving``) normally catches
    a bad checkpoint already; this is the second line for model ids that were not
    a local directory, and it records which (tensor, part) pairs arrived so a
    fused layer missing one part is refused instead of running on garbage.
    """

    def __init__(self, method: "W4A8DintLinearMethod", kind: str, inner: Any) -> None:
        self.method, self.kind, self.inner = method, kind, inner

    def __call__(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        part = _shard_index(shard_id)
        self.method.check_loaded_tensor(self.kind, part, loaded_weight)
        self.inner(param, loaded_weight, *args, **kwargs)
        self.method.loaded.add((self.kind, part))


@register_weight_loader_v2_supported_method
class W4A8DintLinearMethod(LinearMethodBase):
    """One quantized vLLM linear (possibly fused from several HF linears)."""

    def __init__(self, qconfig: W4A8Config, prefix: str, parts: list[str], policy: LayerPolicy,
                 prefer_kernel: str | None = None) -> None:
        self.qconfig = qconfig
        self.prefix = prefix
        self.parts = parts  # HF module names, in vLLM shard order
        self.policy = policy
        self.prefer_kernel = prefer_kernel
        self.loaded: set[tuple[str, int]] = set()

    # -- weights -------------------------------------------------------------------
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        k_local, n_local = input_size_per_partition, sum(output_partition_sizes)
        self.full_sizes = logical_output_sizes(layer)
        if len(self.full_sizes) != len(self.parts):
            raise ConfigError(
                f"{self.prefix}: vLLM fuses {len(self.full_sizes)} linears here but the model's "
                f"packed_modules_mapping names {self.parts}; this architecture is not supported"
            )
        self.in_features = input_size
        self.group_size = self._local_group_size(input_size, k_local)
        self.params_dtype = params_dtype
        loader = extra_weight_attrs["weight_loader"]

        def checked(kind: str) -> _CheckedLoader:
            return _CheckedLoader(self, kind, loader)

        layer.register_parameter(QWEIGHT, PackedvLLMParameter(
            data=torch.empty(n_local, k_local // 2, dtype=torch.uint8),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=2, weight_loader=checked(QWEIGHT)))
        if self.qconfig.group_size == PER_CHANNEL or self.qconfig.two_level:
            scale = ChannelQuantScaleParameter(data=torch.empty(n_local, 1, dtype=torch.float32), output_dim=0,
                                               weight_loader=checked(WEIGHT_SCALE))
        else:
            scale = GroupQuantScaleParameter(data=torch.empty(n_local, k_local // self.group_size, dtype=torch.float32),
                                             input_dim=1, output_dim=0, weight_loader=checked(WEIGHT_SCALE))
        layer.register_parameter(WEIGHT_SCALE, scale)
        if self.qconfig.two_level:
            groups_local = k_local // self.group_size
            if k_local != input_size and groups_local % 2:
                raise ConfigError(
                    f"{self.prefix}: tensor parallelism gives each rank {groups_local} weight groups; two-level "
                    "multipliers are packed two per byte, so a rank needs an even number; use a smaller "
                    "tensor_parallel_size"
                )
            # Packed bytes along K, like group scales: the row-parallel loader's byte offsets are group pairs.
            layer.register_parameter(WEIGHT_GROUP_MULT, GroupQuantScaleParameter(
                data=torch.empty(*packed_group_mult_shape(n_local, groups_local), dtype=torch.uint8),
                input_dim=1, output_dim=0, weight_loader=checked(WEIGHT_GROUP_MULT)))
        if self.policy.act_mode == "per-tensor":
            layer.register_parameter(INPUT_SCALE, PerTensorScaleParameter(
                data=torch.full((len(self.parts),), float("nan"), dtype=torch.float32),
                weight_loader=checked(INPUT_SCALE)))
        if self.policy.smooth:
            layer.register_parameter(SMOOTH_SCALE, SmoothScaleParameter(
                data=torch.full((len(self.parts), k_local), float("nan"), dtype=torch.float32),
                weight_loader=checked(SMOOTH_SCALE)))

        self.absmax_reduce = None
        if isinstance(layer, RowParallelLinear) and layer.tp_size > 1 and self.policy.act_mode == "per-token":
            # Each rank sees a K slice; the per-token scale must come from the whole row.
            self.absmax_reduce = _tp_absmax

    def _local_group_size(self, k_full: int, k_local: int) -> int:
        try:
            g = resolve_group_size(k_full, self.qconfig.group_size)
        except ValueError as e:
            raise ConfigError(f"{self.prefix}: {e}") from e
        if self.qconfig.group_size == PER_CHANNEL:
            g = k_local  # per channel: one group spanning this rank's slice of K
        if k_local % g or k_local % 2:
            raise ConfigError(
                f"{self.prefix}: tensor parallelism splits K={k_full} into slices of {k_local}, which group size "
                f"{self.qconfig.group_size} does not divide; use a smaller tensor_parallel_size"
            )
        return g

    def check_loaded_tensor(self, kind: str, part: int, t: torch.Tensor) -> None:
        """Raise CheckpointError naming the HF tensor if it breaks the contract's table (dtype, shape, values)."""
        name = f"{self.parts[part] if part < len(self.parts) else self.prefix}.{kind}"
        dims = contract.layer_dims(name, self.full_sizes[part], self.in_features, self.qconfig)
        contract.check_loaded_tensor(name, kind, t, dims, self.qconfig)

    def _require_all_loaded(self) -> None:
        kinds = [QWEIGHT, WEIGHT_SCALE]
        kinds += [WEIGHT_GROUP_MULT] if self.qconfig.two_level else []
        kinds += [INPUT_SCALE] if self.policy.act_mode == "per-tensor" else []
        kinds += [SMOOTH_SCALE] if self.policy.smooth else []
        missing = [f"{self.parts[i]}.{kind}" for kind in kinds for i in range(len(self.parts))
                   if (kind, i) not in self.loaded]
        if missing:
            raise CheckpointError(f"{self.prefix}: tensors missing from the checkpoint: {missing}")

    def _shared_across_parts(self, rows: torch.Tensor, kind: str) -> torch.Tensor:
        """The fused parts' copies of an input-side tensor must agree; return one."""
        if not all(torch.equal(rows[0], r) for r in rows[1:]):
            raise CheckpointError(
                f"{self.prefix}: {kind} differs between {self.parts}; vLLM runs them as one GEMM on one "
                "quantized input, so they must share it (calibrate them together)"
            )
        return rows[0].clone()

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._require_all_loaded()
        input_scale = smooth = None
        if self.policy.act_mode == "per-tensor":
            input_scale = self._shared_across_parts(layer.input_scale.data.reshape(-1, 1), INPUT_SCALE)
        if self.policy.smooth:
            smooth = self._shared_across_parts(layer.smooth_scale.data, SMOOTH_SCALE)
        qweight, weight_scale = layer.qweight.data, layer.weight_scale.data
        group_mult = layer.weight_group_mult.data if self.qconfig.two_level else None
        spec = W4A8LayerSpec(qweight.shape[0], qweight.shape[1] * 2, self.group_size, self.qconfig.table,
                             self.policy.act_mode, self.qconfig.scale_scheme, out_dtype=self.params_dtype,
                             has_bias=getattr(layer, "bias", None) is not None)
        kernel_cls, skipped = choose_kernel(spec, qweight.device, prefer=self.prefer_kernel)
        kernel = kernel_cls(spec)
        _log_once(
            ("kernel", kernel_cls.name, spec.act_mode, tuple(skipped)),
            "w4a8-dint: %s layers run the '%s' kernel (INT8 activations, %s, format %s, group %s, %s scales)%s",
            spec.act_mode, kernel_cls.name, spec.act_mode, spec.table.name, self.qconfig.group_size,
            spec.scale_scheme, f"; not chosen: {'; '.join(skipped)}" if skipped else "",
        )
        if self.absmax_reduce is not None and not kernel_cls.supports_absmax_reduce:
            _log_once(("tp-absmax", kernel_cls.name),
                      "w4a8-dint: kernel '%s' quantizes row-parallel activations per TP shard; results differ "
                      "slightly from tensor_parallel_size=1", kernel_cls.name, warning=True)
            self.absmax_reduce = None
        layer.w4a8_kernel = kernel
        layer.w4a8_state = kernel.prepare(qweight, weight_scale, group_mult)
        layer.w4a8_input_scale = input_scale
        layer.w4a8_smooth_scale = smooth
        # The kernel state holds what it needs; drop the checkpoint-layout parameters.
        for name in (QWEIGHT, WEIGHT_SCALE, WEIGHT_GROUP_MULT, INPUT_SCALE, SMOOTH_SCALE):
            if hasattr(layer, name):
                setattr(layer, name, None)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.w4a8_kernel.apply(layer.w4a8_state, x, layer.w4a8_input_scale, layer.w4a8_smooth_scale,
                                       bias, self.absmax_reduce)


@register_quantization_config(QUANT_METHOD)
class W4A8DintConfig(QuantizationConfig):
    """``--quantization w4a8-dint`` (also picked up from config.json's quantization_config)."""

    def __init__(self, qconfig: W4A8Config) -> None:
        super().__init__()
        self.qconfig = qconfig
        self.prefer_kernel = os.environ.get(KERNEL_ENV) or None

    def __repr__(self) -> str:
        q = self.qconfig
        return (f"W4A8DintConfig(format={q.format}, group_size={q.group_size}, scale_scheme={q.scale_scheme}, "
                f"act_mode={q.act_mode}, "
                f"layers_with_overrides={len(q.layers)}, method={q.method})")

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # kernel choice (with reasons) happens per layer at load

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # always read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "W4A8DintConfig":
        return cls(W4A8Config.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Runs in the front-end process before any engine starts: refuse a mismatched checkpoint early."""
        from w4a8_dint.vllm_w4a8.validation import validate_for_serving

        if not Path(model_name).is_dir():
            logger.info("w4a8-dint: %s is not a local directory; its tensors are checked as they load", model_name)
            return
        try:
            summary = validate_for_serving(model_name, self.qconfig)
        except CheckpointError as e:
            # vLLM reports this inside a pydantic ValidationError; say whose check it is.
            raise CheckpointError(f"w4a8-dint refuses {model_name}: the checkpoint does not match its "
                                  f"quantization_config: {e}") from e
        logger.info("w4a8-dint: checkpoint matches its config (%s)", summary)

    def hf_parts(self, prefix: str) -> list[str]:
        """HF module names behind a vLLM layer prefix (``...qkv_proj`` -> q/k/v_proj)."""
        head, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings / lm_head (ParallelLMHead) stay in float
        parts = self.hf_parts(prefix)
        skipped = [self.qconfig.is_skipped(p) for p in parts]
        if all(skipped):
            return UnquantizedLinearMethod()
        if any(skipped):
            raise ConfigError(f"{prefix}: modules_to_not_convert keeps only some of the fused {parts} in float")
        policies = [self.qconfig.policy(p) for p in parts]
        if any(p != policies[0] for p in policies[1:]):
            detail = ", ".join(f"{name}: {pol}" for name, pol in zip(parts, policies))
            raise ConfigError(
                f"{prefix}: vLLM fuses {parts} into one GEMM with one activation quantization, "
                f"but their policies differ ({detail})"
            )
        return W4A8DintLinearMethod(self.qconfig, prefix, parts, policies[0], self.prefer_kernel)
