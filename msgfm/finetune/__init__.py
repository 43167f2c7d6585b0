"""Fine-tuning and evaluation of msGFM on the paper's downstream tasks (Tables 2-6).

Entry point: ``launchers/finetune.py`` -> :func:`msgfm.finetune.train.finetune`, which builds the
task module and hands it to the one Trainer of :mod:`msgfm.train`. The pieces:

- :mod:`~msgfm.config.finetune`   ``load_finetune_config("ft_ben")`` (configs: msgfm/configs/ft_*.yaml)
- :mod:`~msgfm.finetune.build` / :mod:`~msgfm.finetune.transfer`  pretraining checkpoint -> task module
  (method 2 ``stack`` / method 1 ``separate``, bias-table interpolation, timm and random baselines)
- :mod:`~msgfm.finetune.data`     task datasets, seeded per-epoch training batches
- :mod:`~msgfm.finetune.evaluate` whole-split metrics, figures, per-class tables
- :mod:`~msgfm.finetune.options`  layer-wise LR decay, linear probing, train fractions
- the tasks themselves (model + head, loss, metric, inference) are :mod:`msgfm.tasks.downstream`
- the downstream converters (vaihingen, sen12mscr, spacenet, spacenet-buildings) are `msgfm convert` kinds in
  :mod:`msgfm.data.convert`

See docs/finetune.md.
"""
