"""Typed run configuration: one small dataclass per component, loaded from YAML.

A run config is composed of component configs (model, MoE, masking, data groups,
optimizer, schedule, training, tracking, kernels). Each validates itself in
``__post_init__``; checks that need two components (the mask patch against the
image size, say) live in :class:`RunConfig`. Every mistake a user can make is a
``ValueError`` whose message names the dotted key and says what to change.

Configs shipped with the package live in ``msgfm/configs/*.yaml`` and load by name;
a YAML file may start from another with ``_base_: NAME_OR_PATH`` and override
only what differs (the ablations do this)::

    cfg = load_config("msgfm_swinb_192", overrides=["model.moe.num_experts=4"])
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from msgfm.sensors import SensorSpec, UnknownSensorError, get_sensor, register_sensor

CONFIG_DIR = Path(__file__).with_name("configs")

# Swin downsamples by 2 three times after the patch embedding: total stride 8 x patch.
NUM_PATCH_MERGES = 3


def _fail(key: str, message: str) -> None:
    raise ValueError(f"config key '{key}': {message}")


def _check_sensor(name: str, key: str) -> None:
    try:
        get_sensor(name)
    except UnknownSensorError as err:
        _fail(key, str(err))


@dataclass(kw_only=True)
class MoEConfig:
    """DeepSpeed-MoE experts that replace the MLP of selected Swin blocks."""

    enabled: bool = True
    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 1.25
    min_capacity: int = 4
    expert_parallel_size: int = 1
    aux_loss_weight: float = 0.01
    # stage index -> block indices (0-based) whose MLP becomes an MoE layer.
    # Paper: every other block of stage 3 (index 2), blocks 1, 3, ..., 17.
    blocks: dict[int, list[int]] = field(default_factory=lambda: {2: list(range(1, 18, 2))})
    drop_tokens: bool = True
    use_residual: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            _fail("model.moe.num_experts", f"must be >= 1, got {self.num_experts}")
        if self.top_k not in (1, 2):
            _fail("model.moe.top_k", f"DeepSpeed MoE supports top-1 or top-2 gating, got {self.top_k}")
        if self.top_k > self.num_experts:
            _fail("model.moe.top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for key in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, key) <= 0:
                _fail(f"model.moe.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.expert_parallel_size < 1 or self.num_experts % self.expert_parallel_size:
            _fail("model.moe.expert_parallel_size",
                  f"{self.expert_parallel_size} must divide num_experts={self.num_experts}; "
                  f"choose a divisor of {self.num_experts}")
        if self.aux_loss_weight < 0:
            _fail("model.moe.aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")


@dataclass(kw_only=True)
class ModelConfig:
    """The shared Swin encoder, the per-sensor embeddings and SimMIM decoders."""

    img_size: int = 192
    patch_size: int = 4
    embed_dim: int = 128
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window_size: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Sensors that get a patch embedding f_i and a decoder D_i. Empty: the sensors of the data groups.
    sensors: list[str] = field(default_factory=list)
    # Activation checkpointing, one flag per stage (or one bool for all stages).
    grad_checkpointing: Union[bool, list[bool]] = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            _fail("model.num_heads", f"needs one entry per stage: depths has {len(self.depths)}, "
                                     f"num_heads has {len(self.num_heads)}")
        if len(self.depths) != NUM_PATCH_MERGES + 1:
            _fail("model.depths", f"msGFM's Swin has {NUM_PATCH_MERGES + 1} stages, got {len(self.depths)}")
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if heads < 1 or dim % heads:
                _fail(f"model.num_heads[{i}]", f"stage {i} width {dim} (embed_dim {self.embed_dim} x {2**i}) "
                                               f"is not divisible by {heads} heads")
        if self.patch_size < 1:
            _fail("model.patch_size", f"must be >= 1, got {self.patch_size}")
        stride = self.patch_size * 2**NUM_PATCH_MERGES
        if self.img_size % stride:
            _fail("model.img_size", f"{self.img_size} is not a multiple of the total stride {stride} "
                                    f"(patch {self.patch_size} x {2**NUM_PATCH_MERGES}); try "
                                    f"{max(stride, self.img_size // stride * stride)}")
        for i, res in enumerate(self.stage_resolutions):
            window = min(self.window_size, res)
            if res % window:
                _fail("model.window_size", f"window {self.window_size} does not divide stage {i}'s "
                                           f"{res}x{res} feature map (img_size {self.img_size}); pick a "
                                           f"window that divides {res}, or an img_size that fits")
        if isinstance(self.grad_checkpointing, list) and len(self.grad_checkpointing) != len(self.depths):
            _fail("model.grad_checkpointing", f"give one flag per stage ({len(self.depths)}) or a single bool")
        for rate_key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, rate_key) < 1.0:
                _fail(f"model.{rate_key}", f"must be in [0, 1), got {getattr(self, rate_key)}")
        if self.moe.enabled:
            for stage, blocks in self.moe.blocks.items():
                if not 0 <= stage < len(self.depths):
                    _fail("model.moe.blocks", f"stage {stage} does not exist (stages 0..{len(self.depths) - 1})")
                bad = [b for b in blocks if not 0 <= b < self.depths[stage]]
                if bad:
                    _fail("model.moe.blocks", f"stage {stage} has {self.depths[stage]} blocks; "
                                              f"block indices {bad} are out of range")
        for name in self.sensors:
            _check_sensor(name, "model.sensors")

    @property
    def stage_resolutions(self) -> list[int]:
        """Side length of the token grid of each stage."""
        base = self.img_size // self.patch_size
        return [base // 2**i for i in range(len(self.depths))]

    @property
    def num_features(self) -> int:
        """Channel width of the final stage (the decoders' input)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def encoder_stride(self) -> int:
        return self.patch_size * 2**NUM_PATCH_MERGES

    def checkpointed_stages(self) -> list[bool]:
        if isinstance(self.grad_checkpointing, bool):
            return [self.grad_checkpointing] * len(self.depths)
        return list(self.grad_checkpointing)


@dataclass(kw_only=True)
class MaskingConfig:
    """SimMIM random masking: square patches of ``mask_patch_size`` pixels."""

    mask_patch_size: int = 32
    mask_ratio: float = 0.6

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            _fail("masking.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size < 1:
            _fail("masking.mask_patch_size", f"must be >= 1, got {self.mask_patch_size}")


@dataclass(kw_only=True)
class PretrainConfig:
    """The msGFM objective (Section 3.4)."""

    # Probability that a paired sensor's masked image is decoded into its partner (Eq. 1).
    cross_rate: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.cross_rate <= 1.0:
            _fail("pretrain.cross_rate", f"must be in [0, 1], got {self.cross_rate}")


@dataclass(kw_only=True)
class DataGroupConfig:
    """One pretraining data group: its sensors (two = a co-registered pair), shards and rates."""

    name: str
    sensors: list[str]
    # Shard globs, relative to data.root unless absolute.
    shards: list[str] = field(default_factory=list)
    # An int, or "auto": proportional to the group's sample count (see data.total_batch_size_per_gpu).
    batch_size_per_gpu: Union[int, str] = 32
    # Base learning rate; None with "auto" batch sizes: the linear-scaling rule from data.reference_lr.
    lr: float | None = None
    num_workers: int = 2

    def __post_init__(self) -> None:
        key = f"data.groups[{self.name}]"
        if not 1 <= len(self.sensors) <= 2:
            _fail(f"{key}.sensors", f"a group has one sensor (unpaired) or two (a pair), got {self.sensors}")
        if len(set(self.sensors)) != len(self.sensors):
            _fail(f"{key}.sensors", f"lists a sensor twice: {self.sensors}")
        for sensor in self.sensors:
            _check_sensor(sensor, f"{key}.sensors")
        if isinstance(self.batch_size_per_gpu, str):
            if self.batch_size_per_gpu != "auto":
                _fail(f"{key}.batch_size_per_gpu", f"an integer or 'auto', got '{self.batch_size_per_gpu}'")
        elif self.batch_size_per_gpu < 1:
            _fail(f"{key}.batch_size_per_gpu", f"must be >= 1, got {self.batch_size_per_gpu}")
        if self.lr is not None and self.lr <= 0:
            _fail(f"{key}.lr", f"must be > 0, got {self.lr}")
        if self.lr is None and self.batch_size_per_gpu != "auto":
            _fail(f"{key}.lr", "set a base learning rate (or batch_size_per_gpu: auto to derive it)")
        if self.num_workers < 0:
            _fail(f"{key}.num_workers", f"must be >= 0, got {self.num_workers}")

    @property
    def paired(self) -> bool:
        return len(self.sensors) == 2


@dataclass(kw_only=True)
class AugmentConfig:
    """The paper's recipe, applied identically to every sensor of a paired sample."""

    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True
    vflip: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            _fail("data.augment.crop_scale", f"needs 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            _fail("data.augment.crop_ratio", f"needs 0 < min <= max, got {self.crop_ratio}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how the groups are batched."""

    root: str = "data"
    groups: list[DataGroupConfig] = field(default_factory=list)
    # For batch_size_per_gpu: auto, the per-GPU batch summed over the groups, split by sample count.
    total_batch_size_per_gpu: int | None = None
    # Linear scaling for auto LRs: lr = reference_lr x batch / reference_batch_size.
    reference_lr: float = 1e-4
    reference_batch_size: int = 128
    stats_file: str = "stats.json"
    val_fraction: float = 0.01
    # Corrupt samples skipped during a run before it stops, as a fraction of samples read.
    max_corrupt_fraction: float = 0.001
    prefetch_factor: int = 2
    pin_memory: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            _fail("data.groups", f"group names must be unique, repeated: {dupes}")
        if not 0.0 <= self.val_fraction < 1.0:
            _fail("data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.max_corrupt_fraction < 1.0:
            _fail("data.max_corrupt_fraction", f"must be in [0, 1), got {self.max_corrupt_fraction}")
        if any(g.batch_size_per_gpu == "auto" for g in self.groups) and not self.total_batch_size_per_gpu:
            _fail("data.total_batch_size_per_gpu", "set it when any group uses batch_size_per_gpu: auto")

    def group(self, name: str) -> DataGroupConfig:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"unknown data group '{name}'; configured groups: {[g.name for g in self.groups]}")

    @property
    def sensors(self) -> list[str]:
        """Every sensor of every group, in first-seen order."""
        seen: dict[str, None] = {}
        for g in self.groups:
            seen.update(dict.fromkeys(g.sensors))
        return list(seen)


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW as in the paper; ``implementation`` picks the kernel."""

    name: Literal["adamw"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.05
    # auto: DeepSpeed's fused Adam on GPU, torch AdamW on CPU; apex: NVIDIA apex FusedAdam.
    implementation: Literal["auto", "torch", "deepspeed", "apex"] = "auto"

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("optimizer.betas", f"two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            _fail("optimizer.eps", f"must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            _fail("optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Per-iteration LR factor: linear warm-up, then multistep, cosine or constant."""

    epochs: int = 800
    warmup_epochs: float = 10
    warmup_start_lr: float = 5e-7
    kind: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [700])
    gamma: float = 0.1
    min_lr: float = 5e-6  # cosine floor

    def __post_init__(self) -> None:
        if self.epochs < 1:
            _fail("schedule.epochs", f"must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs < self.epochs:
            _fail("schedule.warmup_epochs", f"must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        bad = [m for m in self.milestones if not self.warmup_epochs <= m <= self.epochs]
        if self.kind == "multistep" and bad:
            _fail("schedule.milestones", f"{bad} lie outside [warmup_epochs, epochs] = "
                                         f"[{self.warmup_epochs}, {self.epochs}]")
        if not 0 < self.gamma <= 1:
            _fail("schedule.gamma", f"must be in (0, 1], got {self.gamma}")


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: step structure, seeds, checkpoints, validation."""

    # per_group: one optimizer step per group batch with that group's LR (the paper);
    # joint: one step on the summed group losses (an ablation).
    mode: Literal["per_group", "joint"] = "per_group"
    seed: int = 0
    max_steps: int | None = None  # stop early (demo, tests); None: schedule.epochs
    log_interval: int = 10
    checkpoint_interval: int = 1000  # steps; also at every epoch end
    keep_last: int = 3
    val_interval_epochs: int = 1
    max_val_batches: int | None = None
    # Consecutive non-finite losses tolerated (fp16 overflow skips) before the run stops.
    max_nonfinite_steps: int = 20

    def __post_init__(self) -> None:
        for key in ("log_interval", "checkpoint_interval", "keep_last", "val_interval_epochs", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                _fail(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            _fail("train.max_steps", f"must be >= 1 or null, got {self.max_steps}")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow, rank 0 only. No URI: a local store in the run folder."""

    enabled: bool = True
    experiment: str = "msgfm"
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI wins when set
    log_interval: int = 10
    figure_interval: int = 500

    def __post_init__(self) -> None:
        for key in ("log_interval", "figure_interval"):
            if getattr(self, key) < 1:
                _fail(f"tracking.{key}", f"must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class KernelsConfig:
    """Implementation switches for the hot ops (see msgfm/ops)."""

    attention: Literal["auto", "fused", "sdpa", "eager"] = "auto"
    window_process: Literal["auto", "fused", "torch"] = "auto"
    layernorm: Literal["torch", "apex"] = "torch"


@dataclass(kw_only=True)
class RunConfig:
    """A whole experiment."""

    name: str = "msgfm"
    # Extra sensors declared in YAML: name -> {bands, wavelengths_nm, gsd_m, rgb_bands, description}
    sensors: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def __post_init__(self) -> None:
        m, mask = self.model, self.masking
        if mask.mask_patch_size % m.patch_size:
            _fail("masking.mask_patch_size", f"{mask.mask_patch_size} is not a multiple of the model patch "
                                             f"size {m.patch_size}")
        if m.img_size % mask.mask_patch_size:
            _fail("masking.mask_patch_size", f"{mask.mask_patch_size} does not divide model.img_size {m.img_size}")
        missing = [s for s in self.data.sensors if m.sensors and s not in m.sensors]
        if missing:
            _fail("model.sensors", f"data groups use sensors {missing} that the model has no embedding for; "
                                   f"add them or leave model.sensors empty")

    @property
    def sensors_in_model(self) -> list[str]:
        """Sensors with an embedding and a decoder: model.sensors, else those of the data groups."""
        return list(self.model.sensors) or self.data.sensors

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Loading: YAML -> nested dicts -> dataclasses, with every key and type checked.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        _fail(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            _fail(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} (key)"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config key '{key}': unsupported annotation {tp}")  # a bug in this module


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ValueError(f"unknown config key {where}; valid keys{' under ' + repr(prefix) if prefix else ''}: "
                         f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"config section '{prefix or cls.__name__}': {err}") from None


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; lists and scalars in ``update`` replace those in ``base``."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.exists():
        raise FileNotFoundError(f"no config named '{name_or_path}'; shipped configs: {', '.join(list_configs())} "
                                f"(or pass a path to a .yaml file)")
    return shipped


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml_tree(name_or_path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    path = resolve_config_path(name_or_path).resolve()
    if path in seen:
        raise ValueError(f"config {path} inherits from itself through _base_")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping at the top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    base_path = base if (path.parent / str(base)).suffix not in (".yaml", ".yml") else path.parent / str(base)
    return _merge(_read_yaml_tree(base_path, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.moe.num_experts=4`` -> (["model", "moe", "num_experts"], 4); values are YAML."""
    if "=" not in text:
        raise ValueError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override '{text}': empty component in the dotted key")
    return parts, yaml.safe_load(raw)


def _apply_override(tree: dict, parts: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node.get(part), list) and parts[i + 1:]:
            # groups are addressed by name: data.groups.rgb.batch_size_per_gpu=64
            items = node[part]
            match = [g for g in items if isinstance(g, dict) and g.get("name") == parts[i + 1]]
            if not match:
                raise ValueError(f"override '{text}': no entry named '{parts[i + 1]}' in '{part}' "
                                 f"(names: {[g.get('name') for g in items if isinstance(g, dict)]})")
            _apply_override(match[0], parts[i + 2:], value, text)
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{text}': '{part}' is not a section")
    node[parts[-1]] = value


def config_from_dict(tree: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig`; registers sensors declared under ``sensors:``."""
    for name, spec in (tree.get("sensors") or {}).items():
        register_sensor(SensorSpec.from_dict(name, spec), replace=True)
    return _from_dict(RunConfig, tree)


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a shipped config by name (``msgfm_swinb_192``) or a YAML path, then apply dotted overrides."""
    tree = _read_yaml_tree(name_or_path)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(tree, parts, value, text)
    return config_from_dict(tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that :func:`load_config` reads back to an equal config."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
