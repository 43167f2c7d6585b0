"""msgfm: msGFM pretraining and fine-tuning on DeepSpeed."""
__version__ = "0.1.0"
