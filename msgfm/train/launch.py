"""What every launcher shares: DeepSpeed's arguments, dotted overrides, one-line user errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def parse_launcher_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Add the arguments the deepspeed launcher and torchrun pass, and trailing overrides; parse ``argv``."""
    import deepspeed

    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (e.g. ds_configs/v100x8.json or ds_configs/cpu.json)")
    return args


def run_reporting_user_errors(name: str, job: Callable[[], int]) -> int:
    """Run ``job``; a user error (bad config, missing file) ends as one line ``NAME: error: ...`` and exit 2."""
    try:
        return job()
    except (ValueError, FileNotFoundError) as err:
        print(f"{name}: error: {err}", file=sys.stderr, flush=True)
        return 2
