"""Fine-tuning configuration: the task, the transfer, the data, and what is shared with pretraining.

Loaded like the pretraining configs (YAML, ``_base_`` inheritance, dotted
overrides, unknown keys rejected), with the component dataclasses of
:mod:`msgfm.config` reused for the model, optimizer, schedule, tracking and kernels::

    cfg = load_finetune_config("ft_ben_tiny", overrides=["transfer.method=separate"])

Shipped configs: ``msgfm/configs/ft_*.yaml``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from msgfm.config.loader import apply_override, from_dict, parse_override, read_yaml_tree
from msgfm.config.schema import (
    KernelsConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrackingConfig,
    check_sensor,
    config_error,
)
from msgfm.sensors import SensorSpec, register_sensor

TASKS = ("ben", "vaihingen", "sen12mscr", "spacenet", "spacenet_buildings")
TaskKind = Literal["multilabel", "segmentation", "restoration"]
# spacenet_buildings: segmentation of SpaceNet building masks (the real-data check of the segmentation path)
TASK_KINDS: dict[str, TaskKind] = {"ben": "multilabel", "vaihingen": "segmentation", "sen12mscr": "restoration",
                              "spacenet": "restoration", "spacenet_buildings": "segmentation"}


@dataclass(kw_only=True)
class TaskConfig:
    """What is predicted from what, and how it is scored."""

    name: Literal["ben", "vaihingen", "sen12mscr", "spacenet", "spacenet_buildings"] = "ben"
    # multilabel (ben), segmentation (vaihingen, other masks), restoration (sen12mscr, spacenet)
    kind: TaskKind | Literal[""] = ""
    # Input sensors, in stacking order (method 2) / feature order (method 1).
    sensors: list[str] = field(default_factory=lambda: ["sar", "s2"])
    # multilabel / segmentation
    num_classes: int = 19
    label: str = ""  # labels/<label> in the shards; "" -> multilabel / segmentation by kind
    ignore_index: int = 255
    exclude_from_mean: list[int] = field(default_factory=list)  # classes left out of mIoU
    # restoration: the sensor (or labels/<target_label>) to predict, in physical units
    target_sensor: str = ""
    target_label: str = ""  # e.g. s2_cloud_free for SEN12MS-CR
    target_scale: float = 1.0  # physical = raw * target_scale (reflectance 1e-4 for S2 uint16)
    data_range: float = 1.0  # PSNR / SSIM data range, physical units
    clip_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # targets and predictions clipped
    # pan-sharpening (Wald's protocol): the MS input is the target degraded by this factor
    resolution_ratio: int = 0  # 0: not pan-sharpening; also ERGAS's ratio
    # segmentation inference over large tiles
    eval_tile: int = 0  # 0: whole images in one pass
    eval_overlap: float = 0.5

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = TASK_KINDS[self.name]
        if not self.sensors:
            config_error("task.sensors", "list at least one input sensor")
        for s in self.sensors:
            check_sensor(s, "task.sensors")
        if len(set(self.sensors)) != len(self.sensors):
            config_error("task.sensors", f"lists a sensor twice: {self.sensors}")
        if self.kind in ("multilabel", "segmentation") and self.num_classes < 2:
            config_error("task.num_classes", f"must be >= 2, got {self.num_classes}")
        if self.kind == "restoration":
            if not self.target_sensor:
                config_error("task.target_sensor", "a restoration task names the sensor whose bands it predicts")
            check_sensor(self.target_sensor, "task.target_sensor")
            if self.data_range <= 0:
                config_error("task.data_range", f"must be > 0, got {self.data_range}")
            if len(self.clip_range) != 2 or self.clip_range[0] >= self.clip_range[1]:
                config_error("task.clip_range", f"needs [low, high] with low < high, got {self.clip_range}")
        if self.resolution_ratio < 0 or self.resolution_ratio == 1:
            config_error("task.resolution_ratio", f"0 (off) or an integer >= 2, got {self.resolution_ratio}")
        if self.eval_tile < 0 or not 0 <= self.eval_overlap < 1:
            config_error("task.eval_tile", "eval_tile >= 0 and eval_overlap in [0, 1)")

    @property
    def label_name(self) -> str:
        return self.label or ("multilabel" if self.kind == "multilabel" else "segmentation")


@dataclass(kw_only=True)
class TransferConfig:
    """How the pretrained encoder is used (Appendix C.2) and the options the field expects."""

    # pretrained: --pretrained CKPT_DIR; random: random init (Table 3 baseline); timm: timm_weights file
    init: Literal["pretrained", "random", "timm"] = "pretrained"
    timm_weights: str = ""  # a timm SwinTransformer state dict (.pth/.safetensors) for init: timm
    timm_sensor: str = ""  # which task sensor's channels the timm patch embedding is for ("" -> first)
    method: Literal["stack", "separate"] = "stack"  # method 2 (default) or method 1
    freeze_encoder: bool = False  # linear probing
    layer_decay: float = 1.0  # layer-wise LR decay; 1 = off
    head_norm: Literal["bn", "gn"] = "bn"
    head_channels: int = 512  # UPerNet width
    head_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.layer_decay <= 1:
            config_error("transfer.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        if self.init == "timm" and not self.timm_weights:
            config_error("transfer.timm_weights", "init: timm needs the path of a timm Swin state dict")
        if self.head_channels < 1:
            config_error("transfer.head_channels", f"must be >= 1, got {self.head_channels}")


@dataclass(kw_only=True)
class FinetuneDataConfig:
    """Shards of each split (globs relative to root), batch sizes and the training subset."""

    root: str = "data"
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    stats_file: str = ""  # "" -> stats.json beside the training shards
    train_fraction: float = 1.0  # 0.01 / 0.1 / 1.0
    fraction_seed: int = 0
    batch_size_per_gpu: int = 32
    eval_batch_size_per_gpu: int = 32
    num_workers: int = 2
    pin_memory: bool = True
    hflip: bool = True
    vflip: bool = True
    # Random crop of this size for training (segmentation on tiles larger than the model); 0 = off.
    train_crop: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.train_fraction <= 1:
            config_error("data.train_fraction", f"must be in (0, 1], got {self.train_fraction}")
        for key in ("batch_size_per_gpu", "eval_batch_size_per_gpu"):
            if getattr(self, key) < 1:
                config_error(f"data.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0 or self.train_crop < 0:
            config_error("data.num_workers", "num_workers and train_crop must be >= 0")


@dataclass(kw_only=True)
class FinetuneTrainConfig:
    seed: int = 0
    lr: float = 1e-4  # base LR (the head and top layer get it, lower layers decay)
    # Linear LR scaling, GFM's convention (the paper's [39]): the rates in effect are train.lr,
    # schedule.warmup_start_lr and schedule.min_lr x global batch (batch_size_per_gpu x ranks) /
    # lr_reference_batch (GFM: 512). null: the rates are used as given.
    lr_reference_batch: int | None = None
    max_steps: int | None = None
    log_interval: int = 10
    eval_interval_epochs: int = 1
    keep_last: int = 2
    max_eval_batches: int | None = None
    num_figures: int = 4  # prediction figures logged per evaluation
    # Consecutive non-finite losses tolerated (fp16 overflow skips) before the run stops.
    max_nonfinite_steps: int = 20

    def __post_init__(self) -> None:
        if self.lr <= 0:
            config_error("train.lr", f"must be > 0, got {self.lr}")
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            config_error("train.lr_reference_batch", f"a batch size >= 1, or null for no scaling, got "
                                                     f"{self.lr_reference_batch}")
        for key in ("log_interval", "eval_interval_epochs", "keep_last", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                config_error(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class FinetuneConfig:
    """A whole fine-tuning run."""

    name: str = "finetune"
    sensors: dict[str, Any] = field(default_factory=dict)  # extra sensors, as in RunConfig
    task: TaskConfig = field(default_factory=TaskConfig)
    # The encoder for init: random / timm; with a checkpoint, only img_size, window_size and
    # drop_path_rate are taken from here (the rest comes from the checkpoint's config).
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=100, warmup_epochs=5,
                                                                           kind="cosine", milestones=[]))
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="msgfm-finetune"))
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def __post_init__(self) -> None:
        if self.transfer.init == "timm" and self.transfer.method != "stack":
            config_error("transfer.method", "timm weights have one patch embedding: use method stack with init timm")
        if self.task.kind == "restoration" and self.task.target_sensor not in self.task.sensors \
                and not self.task.target_label:
            config_error("task.target_label", f"target sensor '{self.task.target_sensor}' is not an input; name the "
                                       f"labels/<name> dataset that holds it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_finetune_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """A shipped fine-tuning config by name (``ft_ben_tiny``) or a YAML path, with dotted overrides."""
    tree = read_yaml_tree(name_or_path)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, text)
    for name, spec in (tree.get("sensors") or {}).items():
        register_sensor(SensorSpec.from_dict(name, spec), replace=True)
    return from_dict(FinetuneConfig, tree)


def save_finetune_config(cfg: FinetuneConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
