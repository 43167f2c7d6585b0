"""Commands that work on a run folder after (or while) it trains, without starting training:
``msgfm verify`` (checkpoints against their manifests). They import torch only when run, so
``msgfm --help`` stays quick."""
