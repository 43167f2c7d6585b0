"""Typed run configuration, loaded from YAML: ``load_config(name_or_path, overrides=())``.

:mod:`msgfm.config.schema` holds one small dataclass per component, each validating
itself; :mod:`msgfm.config.loader` reads YAML (with ``_base_`` inheritance and dotted
overrides) into them. Everything is re-exported here.
"""
from msgfm.config.finetune import (
                                 TASK_KINDS,
                                 TASKS,
                                 FinetuneConfig,
                                 FinetuneDataConfig,
                                 FinetuneTrainConfig,
                                 TaskConfig,
                                 TransferConfig,
                                 load_finetune_config,
                                 save_finetune_config,
)
from msgfm.config.loader import (
                                 CONFIG_DIR,
                                 apply_override,
                                 config_from_dict,
                                 from_dict,
                                 list_configs,
                                 load_config,
                                 parse_override,
                                 read_yaml_tree,
                                 resolve_config_path,
                                 save_config,
)
from msgfm.config.schema import (
                                 NUM_PATCH_MERGES,
                                 AugmentConfig,
                                 DataConfig,
                                 DataGroupConfig,
                                 KernelsConfig,
                                 MaskingConfig,
                                 ModelConfig,
                                 MoEConfig,
                                 OptimizerConfig,
                                 PretrainConfig,
                                 RunConfig,
                                 ScheduleConfig,
                                 TrackingConfig,
                                 TrainConfig,
                                 check_sensor,
                                 config_error,
)
from msgfm.sensors import SensorSpec, register_sensor

__all__ = [
    "CONFIG_DIR", "NUM_PATCH_MERGES", "AugmentConfig", "DataConfig", "DataGroupConfig", "KernelsConfig",
    "MaskingConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "PretrainConfig", "RunConfig", "ScheduleConfig",
    "SensorSpec", "TrackingConfig", "TrainConfig", "config_from_dict", "list_configs", "load_config",
    "parse_override", "register_sensor", "resolve_config_path", "save_config",
    "apply_override", "check_sensor", "config_error", "from_dict", "read_yaml_tree",
    # fine-tuning runs (msgfm/config/finetune.py)
    "TASKS", "TASK_KINDS", "FinetuneConfig", "FinetuneDataConfig", "FinetuneTrainConfig", "TaskConfig",
    "TransferConfig", "load_finetune_config", "save_finetune_config",
]
