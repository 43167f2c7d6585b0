"""msgfm: msGFM pretraining and fine-tuning on DeepSpeed.

``import msgfm`` stays light (torch and timm, no DeepSpeed, MLflow or rasterio): it registers the
msGFM architectures with timm (msgfm/backbone/timm_models.py) and offers :func:`load_backbone`.
"""
__version__ = "0.1.0"

from msgfm.backbone import load_backbone  # noqa: E402  (after __version__: the exporter reads it)
from msgfm.backbone import timm_models as _timm_models  # noqa: E402, F401  (registers the timm names)

__all__ = ["__version__", "load_backbone"]
