"""Fine-tune a pretrained msGFM on a downstream task (or evaluate a fine-tuned model).

    deepspeed --num_gpus 8 launchers/finetune.py --deepspeed_config ds_configs/v100x8.json \
        --task ben --pretrained runs/msgfm --data-root data/ben --output-dir runs/ft_ben
    python launchers/finetune.py --deepspeed_config ds_configs/cpu.json --task ben --config ft_ben_tiny \
        --pretrained runs/demo --data-root data/ben_tiny --output-dir runs/ft_ben_tiny      # one CPU process
    python launchers/finetune.py --deepspeed_config ds_configs/cpu.json --task ben --config ft_ben_tiny \
        --eval-only --checkpoint runs/ft_ben_tiny --data-root data/ben_tiny --output-dir runs/ft_ben_tiny

--config defaults to ft_<task>. ``dotted.key=value`` arguments, anywhere on the command line, override the config
(``transfer.method=separate``, ``data.train_fraction=0.1``, ``transfer.init=random``). See docs/finetune.md.
"""
import argparse
import sys

from msgfm.config.finetune import TASKS
from msgfm.finetune.train import finetune
from msgfm.train.launch import parse_launcher_args, run_reporting_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS, help="downstream task")
    parser.add_argument("--config", default=None, help="fine-tuning config name or YAML (default: ft_<task>)")
    parser.add_argument("--pretrained", default=None, help="pretraining checkpoint folder or run folder")
    parser.add_argument("--data-root", default=None, help="folder of the task's shards (default: data.root)")
    parser.add_argument("--output-dir", default=None,
                        help="checkpoints, MLflow store, figures (default: runs/ft_<task>)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the val and test splits")
    parser.add_argument("--checkpoint", default=None, help="with --eval-only: a fine-tuning run folder or weights")
    parser.add_argument("--allow-config-change", action="store_true", help="resume a run folder whose checkpoint "
                        "was written with other training settings (learning rates, batch sizes, ...): the "
                        "differences are printed and recorded; architecture changes are always refused")
    return parse_launcher_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = args.output_dir or f"runs/ft_{args.task}"
    return run_reporting_user_errors("finetune", lambda: finetune(
        args.config or f"ft_{args.task}", args.overrides, args.deepspeed_config, task_name=args.task,
        pretrained=args.pretrained, data_root=args.data_root, output_dir=output_dir,
        eval_only=args.eval_only, checkpoint=args.checkpoint, allow_config_change=args.allow_config_change),
        verbose=args.verbose, output_dir=None if args.eval_only else output_dir)


if __name__ == "__main__":
    sys.exit(main())
