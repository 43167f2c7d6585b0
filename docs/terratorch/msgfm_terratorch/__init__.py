"""TerraTorch custom module: importing it registers msgfm's backbones (msgfm_swinb_192, msgfm_swin, ...)
in TerraTorch's backbone registry. Point TerraTorch at this folder with `custom_modules_path`
(in the YAML, or TERRATORCH_CUSTOM_MODULE_PATH)."""
import msgfm.backbone.terratorch  # noqa: F401
