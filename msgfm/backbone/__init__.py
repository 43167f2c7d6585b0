"""msGFM's backbone without DeepSpeed: an exported model as a timm Swin with plain-torch MoE layers.

``msgfm.load_backbone(EXPORT_DIR, sensors=...)`` (msgfm/backbone/model.py) and the timm names
(msgfm/backbone/timm_models.py). This package imports torch, timm and safetensors only: it
runs where DeepSpeed, MLflow and rasterio are not installed. See docs/export.md.
"""
from msgfm.backbone.model import (
                                  CONFIG_FILE,
                                  FORMAT_NAME,
                                  FORMAT_VERSION,
                                  WEIGHTS_FILE,
                                  MsGFMSwin,
                                  load_backbone,
                                  read_config,
)
from msgfm.backbone.moe import Top1MoE

__all__ = ["CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_FILE", "MsGFMSwin", "Top1MoE", "load_backbone",
           "read_config"]
