"""Commands that work on a run folder after (or while) it trains, without starting training:
``msgfm verify`` (checkpoints against their manifests) and ``msgfm track-sync`` (replay
metrics.jsonl, figures and configs into MLflow). They import torch and MLflow only when run,
so ``msgfm --help`` stays quick."""
