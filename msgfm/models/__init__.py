"""The msGFM backbone: per-sensor embeddings, a mask token, the shared Swin (+ DeepSpeed-MoE) encoder.

Objectives around it (pretraining, downstream tasks) live in :mod:`msgfm.tasks`.
"""
from msgfm.models.adapter import (
                                  backbone_state,
                                  backbone_to_timm,
                                  export_timm_state_dict,
                                  load_timm_state_dict,
                                  timm_to_backbone,
)
from msgfm.models.backbone import MsGFMBackbone
from msgfm.models.embed import PatchEmbed
from msgfm.models.moe import MoEMlp, init_expert_groups, moe_modules, reinit_experts
from msgfm.models.swin import SwinEncoder

__all__ = [
    "MoEMlp",
    "MsGFMBackbone",
    "PatchEmbed",
    "SwinEncoder",
    "backbone_state",
    "backbone_to_timm",
    "export_timm_state_dict",
    "init_expert_groups",
    "load_timm_state_dict",
    "moe_modules",
    "reinit_experts",
    "timm_to_backbone",
]
