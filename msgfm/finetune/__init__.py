"""Fine-tuning and evaluation of msGFM on the paper's downstream tasks (Tables 2-6).

Entry point: ``launchers/finetune.py`` -> :func:`msgfm.finetune.train.finetune`. The pieces:

- :mod:`~msgfm.finetune.config`   ``load_finetune_config("ft_ben")`` (configs: msgfm/configs/ft_*.yaml)
- :mod:`~msgfm.finetune.transfer` / :mod:`~msgfm.finetune.build`  pretraining checkpoint -> fine-tuning
  model (method 2 ``stack`` / method 1 ``separate``, bias-table interpolation, timm and random baselines)
- :mod:`~msgfm.finetune.model`    embeddings + shared Swin encoder + task head
- :mod:`~msgfm.finetune.heads`    linear head, UPerNet, restoration decoder
- :mod:`~msgfm.finetune.tasks`    loss, metric and inference per task (sliding windows, Wald's protocol)
- :mod:`~msgfm.finetune.metrics`  mAP, mIoU/OA, MAE/SAM/SSIM/PSNR/ERGAS over the whole evaluation set
- :mod:`~msgfm.finetune.options`  layer-wise LR decay, linear probing, train fractions
- the downstream converters (vaihingen, sen12mscr, spacenet, spacenet-buildings) are `msgfm convert` kinds in
  :mod:`msgfm.data.convert`

See docs/finetune.md.
"""
