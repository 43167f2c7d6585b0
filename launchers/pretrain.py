"""Pretrain msGFM with DeepSpeed.

    deepspeed --num_gpus 8 launchers/pretrain.py --deepspeed_config ds_configs/v100x8.json \
        --data-root /data/msgfm --output-dir runs/paper
    deepspeed --hostfile hosts launchers/pretrain.py --deepspeed_config ...      # several nodes
    torchrun --nproc_per_node 8 launchers/pretrain.py --deepspeed_config ...
    python launchers/pretrain.py --deepspeed_config ds_configs/v100x8.json --dry-run   # check on one CPU

``dotted.key=value`` arguments, anywhere on the command line, override the config (``train.max_steps=100``).
"""
import argparse
import sys

from msgfm.train import pretrain
from msgfm.train.launch import parse_launcher_args, run_reporting_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="msgfm_swinb_192", help="shipped config name or YAML path")
    parser.add_argument("--data-root", default=None, help="folder of the HDF5 shards (default: data.root)")
    parser.add_argument("--output-dir", default="runs/msgfm", help="checkpoints, MLflow store, figures")
    parser.add_argument("--dry-run", action="store_true", help="check the configuration for --world-size ranks "
                        "on this machine, print parameter counts and memory, do not train")
    parser.add_argument("--world-size", type=int, default=None, help="dry run: target world size (default: "
                        "from the ds_config name, v100x8 -> 8)")
    parser.add_argument("--allow-config-change", action="store_true", help="resume a run folder whose checkpoint "
                        "was written with other training settings (learning rates, batch sizes, ...): the "
                        "differences are printed and recorded; architecture changes are always refused")
    return parse_launcher_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_user_errors("pretrain", lambda: pretrain(
        args.config, args.overrides, args.deepspeed_config, args.data_root, args.output_dir,
        dry_run=args.dry_run, world_size=args.world_size,
        allow_config_change=args.allow_config_change), verbose=args.verbose,
        output_dir=None if args.dry_run else args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
