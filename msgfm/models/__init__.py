"""msGFM models: per-sensor embeddings, the shared Swin (+ DeepSpeed-MoE) encoder, SimMIM decoders."""
from msgfm.models.decoder import SimMIMDecoder
from msgfm.models.embed import PatchEmbed
from msgfm.models.interop import export_timm_state_dict, load_timm_state_dict
from msgfm.models.moe import MoEMlp, init_expert_groups, reinit_experts
from msgfm.models.msgfm import MsGFM, build_pretrain_model
from msgfm.models.params import count_parameters
from msgfm.models.swin import SwinEncoder

__all__ = [
    "MoEMlp",
    "MsGFM",
    "PatchEmbed",
    "SimMIMDecoder",
    "SwinEncoder",
    "build_pretrain_model",
    "count_parameters",
    "export_timm_state_dict",
    "init_expert_groups",
    "load_timm_state_dict",
    "reinit_experts",
]
