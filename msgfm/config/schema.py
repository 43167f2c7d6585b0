"""The run configuration schema: one small dataclass per component.

A run config is composed of component configs (model, MoE, masking, data groups,
optimizer, schedule, training, tracking, kernels). Each validates itself in
``__post_init__``; checks that need two components (the mask patch against the
image size, say) live in :class:`RunConfig`. Every mistake a user can make is a
``ValueError`` whose message names the dotted key and says what to change.

Loading from YAML lives in :mod:`msgfm.config.loader`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from msgfm.errors import UserError
from msgfm.sensors import UnknownSensorError, get_sensor

# Swin downsamples by 2 three times after the patch embedding: total stride 8 x patch.
NUM_PATCH_MERGES = 3


def config_error(key: str, message: str) -> None:
    """Raise the ValueError every config check uses: the dotted key, then what is wrong and what to do."""
    raise UserError(f"config key '{key}': {message}")


def check_sensor(name: str, key: str) -> None:
    """Fail with the config key named when ``name`` is not a registered sensor."""
    try:
        get_sensor(name)
    except UnknownSensorError as err:
        config_error(key, str(err))


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
            config_error("model.moe.num_experts", f"must be >= 1, got {self.num_experts}")
        if self.top_k not in (1, 2):
            config_error("model.moe.top_k", f"DeepSpeed MoE supports top-1 or top-2 gating, got {self.top_k}")
        if self.top_k > self.num_experts:
            config_error("model.moe.top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for key in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, key) <= 0:
                config_error(f"model.moe.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.expert_parallel_size < 1 or self.num_experts % self.expert_parallel_size:
            config_error("model.moe.expert_parallel_size",
                  f"{self.expert_parallel_size} must divide num_experts={self.num_experts}; "
                  f"choose a divisor of {self.num_experts}")
        if self.aux_loss_weight < 0:
            config_error("model.moe.aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")


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
    grad_checkpointing: bool | list[bool] = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            config_error("model.num_heads", f"needs one entry per stage: depths has {len(self.depths)}, "
                                     f"num_heads has {len(self.num_heads)}")
        if len(self.depths) != NUM_PATCH_MERGES + 1:
            config_error("model.depths", f"msGFM's Swin has {NUM_PATCH_MERGES + 1} stages, got {len(self.depths)}")
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if heads < 1 or dim % heads:
                config_error(f"model.num_heads[{i}]", f"stage {i} width {dim} (embed_dim {self.embed_dim} x {2**i}) "
                                               f"is not divisible by {heads} heads")
        if self.patch_size < 1:
            config_error("model.patch_size", f"must be >= 1, got {self.patch_size}")
        stride = self.patch_size * 2**NUM_PATCH_MERGES
        if self.img_size % stride:
            config_error("model.img_size", f"{self.img_size} is not a multiple of the total stride {stride} "
                                    f"(patch {self.patch_size} x {2**NUM_PATCH_MERGES}); try "
                                    f"{max(stride, self.img_size // stride * stride)}")
        for i, res in enumerate(self.stage_resolutions):
            window = min(self.window_size, res)
            if res % window:
                config_error("model.window_size", f"window {self.window_size} does not divide stage {i}'s "
                                           f"{res}x{res} feature map (img_size {self.img_size}); pick a "
                                           f"window that divides {res}, or an img_size that fits")
        if isinstance(self.grad_checkpointing, list) and len(self.grad_checkpointing) != len(self.depths):
            config_error("model.grad_checkpointing", f"give one flag per stage ({len(self.depths)}) or a single bool")
        for rate_key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, rate_key) < 1.0:
                config_error(f"model.{rate_key}", f"must be in [0, 1), got {getattr(self, rate_key)}")
        if self.moe.enabled:
            for stage, blocks in self.moe.blocks.items():
                if not 0 <= stage < len(self.depths):
                    config_error("model.moe.blocks", f"stage {stage} does not exist (stages 0..{len(self.depths) - 1})")
                bad = [b for b in blocks if not 0 <= b < self.depths[stage]]
                if bad:
                    config_error("model.moe.blocks", f"stage {stage} has {self.depths[stage]} blocks; "
                                              f"block indices {bad} are out of range")
        for name in self.sensors:
            check_sensor(name, "model.sensors")

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
            config_error("masking.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size < 1:
            config_error("masking.mask_patch_size", f"must be >= 1, got {self.mask_patch_size}")


@dataclass(kw_only=True)
class PretrainConfig:
    """The msGFM objective (Section 3.4)."""

    # Probability that a paired sensor's masked image is decoded into its partner (Eq. 1).
    cross_rate: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.cross_rate <= 1.0:
            config_error("pretrain.cross_rate", f"must be in [0, 1], got {self.cross_rate}")


@dataclass(kw_only=True)
class DataGroupConfig:
    """One pretraining data group: its sensors (two = a co-registered pair), shards and rates."""

    name: str
    sensors: list[str]
    # Shard globs, relative to data.root unless absolute.
    shards: list[str] = field(default_factory=list)
    # An int, or "auto": proportional to the group's sample count (see data.total_batch_size_per_gpu).
    batch_size_per_gpu: int | str = 32
    # Base learning rate (before optimizer.lr_reference_batch scaling). With "auto" batch sizes leave it
    # out: the linear rule from the reference group sets it (data.reference_lr x batch / reference_batch_size).
    lr: float | None = None
    num_workers: int = 2

    def __post_init__(self) -> None:
        key = f"data.groups[{self.name}]"
        if not 1 <= len(self.sensors) <= 2:
            config_error(f"{key}.sensors", f"a group has one sensor (unpaired) or two (a pair), got {self.sensors}")
        if len(set(self.sensors)) != len(self.sensors):
            config_error(f"{key}.sensors", f"lists a sensor twice: {self.sensors}")
        for sensor in self.sensors:
            check_sensor(sensor, f"{key}.sensors")
        if isinstance(self.batch_size_per_gpu, str):
            if self.batch_size_per_gpu != "auto":
                config_error(f"{key}.batch_size_per_gpu", f"an integer or 'auto', got '{self.batch_size_per_gpu}'")
        elif self.batch_size_per_gpu < 1:
            config_error(f"{key}.batch_size_per_gpu", f"must be >= 1, got {self.batch_size_per_gpu}")
        if self.lr is not None and self.lr <= 0:
            config_error(f"{key}.lr", f"must be > 0, got {self.lr}")
        if self.lr is None and self.batch_size_per_gpu != "auto":
            config_error(f"{key}.lr", "set a base learning rate (or batch_size_per_gpu: auto to derive it)")
        if self.lr is not None and self.batch_size_per_gpu == "auto":
            config_error(f"{key}.lr", "batch_size_per_gpu: auto derives the LR from the reference group "
                                      "(data.reference_lr x batch / data.reference_batch_size); remove lr or give "
                                      "an integer batch size")
        if self.num_workers < 0:
            config_error(f"{key}.num_workers", f"must be >= 0, got {self.num_workers}")

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
            config_error("data.augment.crop_scale", f"needs 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            config_error("data.augment.crop_ratio", f"needs 0 < min <= max, got {self.crop_ratio}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how the groups are batched."""

    root: str = "data"
    groups: list[DataGroupConfig] = field(default_factory=list)
    # For batch_size_per_gpu: auto, the per-GPU batch summed over the groups, split by sample count.
    total_batch_size_per_gpu: int | None = None
    # The reference group of the linear rule for auto batch sizes (Table 10's RGB row):
    # lr = reference_lr x batch / reference_batch_size, set once per auto group.
    reference_lr: float = 1e-4
    reference_batch_size: int = 128
    # every_group_once: an epoch sees every group's training data once, each group's batches spread evenly
    # over the epoch's steps (Appendix B.1); largest_group_once: every group in every step, the smaller
    # groups repeated within an epoch (the older reading).
    epoch: Literal["every_group_once", "largest_group_once"] = "every_group_once"
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
            config_error("data.groups", f"group names must be unique, repeated: {dupes}")
        if not 0.0 <= self.val_fraction < 1.0:
            config_error("data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.max_corrupt_fraction < 1.0:
            config_error("data.max_corrupt_fraction", f"must be in [0, 1), got {self.max_corrupt_fraction}")
        if any(g.batch_size_per_gpu == "auto" for g in self.groups) and not self.total_batch_size_per_gpu:
            config_error("data.total_batch_size_per_gpu", "set it when any group uses batch_size_per_gpu: auto")

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
    # Linear LR scaling as GFM's code does it (lr = base x global batch / 512, for the base, warm-up and
    # minimum rates); null: the configured rates are used as they are.
    lr_reference_batch: int | None = 512
    # Whose global batch scales a group's rates: the reference group's (reference_group: the groups keep the
    # ratios their base rates set, as the paper's Table 10 does) or each group's own (group).
    lr_scale_by: Literal["group", "reference_group"] = "reference_group"

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            config_error("optimizer.betas", f"two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            config_error("optimizer.eps", f"must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            config_error("optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            config_error("optimizer.lr_reference_batch", f"must be >= 1 or null, got {self.lr_reference_batch}")


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
            config_error("schedule.epochs", f"must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs < self.epochs:
            config_error("schedule.warmup_epochs", f"must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        bad = [m for m in self.milestones if not self.warmup_epochs <= m <= self.epochs]
        if self.kind == "multistep" and bad:
            config_error("schedule.milestones", f"{bad} lie outside [warmup_epochs, epochs] = "
                                         f"[{self.warmup_epochs}, {self.epochs}]")
        if not 0 < self.gamma <= 1:
            config_error("schedule.gamma", f"must be in (0, 1], got {self.gamma}")


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: step structure, seeds, checkpoints, validation."""

    # single_update: every group's forward and backward, then one optimizer step; each sensor's own
    # parameters at its group's rate, the shared encoder at the reference group's rate.
    # per_group: one optimizer step per group at that group's rate, touching only the shared parameters
    # and the sensors of that group. docs/training.md says which reading is the paper's and why.
    mode: Literal["single_update", "per_group"] = "single_update"
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
                config_error(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            config_error("train.max_steps", f"must be >= 1 or null, got {self.max_steps}")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow, rank 0 only. No URI: a local store in the run folder."""

    enabled: bool = True
    experiment: str = "msgfm"
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI wins when set
    log_interval: int = 10
    figure_interval: int = 500
    close_timeout_s: float = 10.0  # the most the exit waits for MLflow to take the queued items

    def __post_init__(self) -> None:
        for key in ("log_interval", "figure_interval"):
            if getattr(self, key) < 1:
                config_error(f"tracking.{key}", f"must be >= 1, got {getattr(self, key)}")
        if not self.close_timeout_s >= 0:
            config_error("tracking.close_timeout_s", f"must be >= 0 seconds, got {self.close_timeout_s}")


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
            config_error("masking.mask_patch_size", f"{mask.mask_patch_size} is not a multiple of the model patch "
                                             f"size {m.patch_size}")
        if m.img_size % mask.mask_patch_size:
            config_error("masking.mask_patch_size",
                         f"{mask.mask_patch_size} does not divide model.img_size {m.img_size}")
        missing = [s for s in self.data.sensors if m.sensors and s not in m.sensors]
        if missing:
            config_error("model.sensors", f"data groups use sensors {missing} that the model has no embedding for; "
                                   f"add them or leave model.sensors empty")

    @property
    def sensors_in_model(self) -> list[str]:
        """Sensors with an embedding and a decoder: model.sensors, else those of the data groups."""
        return list(self.model.sensors) or self.data.sensors

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
