"""Entry point: ``accelerate launch -m unibrain_hf.train --config configs/<name>.yaml [key=value ...]``.

    python -m unibrain_hf.train --config configs/tiny_unified.yaml data.path=out/cohort train.max_steps=20
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m unibrain_hf.train --config configs/tiny_unified.yaml
    python -m unibrain_hf.train --config configs/tiny_unified.yaml --resume            # latest checkpoint
    python -m unibrain_hf.train --config configs/tiny_unified.yaml --threads 2         # = train.threads=2

Exit status: 0 done, 2 bad config or input (nothing was written), 3 a checkpoint that cannot be resumed.
"""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unibrain_hf.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume from the latest checkpoint of train.output_dir, or from the given one")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="torch intra-op threads per process (train.threads; default: the usable cores)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        args.overrides.append(f"train.threads={args.threads}")

    from ..errors import CheckpointError, UniBrainError
    from .config import dump_config, load_config

    try:
        config = load_config(args.config, args.overrides, check_paths=not args.print_config)
    except UniBrainError as exc:
        print(f"unibrain train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config))
        return 0
    from .trainer import train

    try:
        result = train(config, resume=args.resume)
    except CheckpointError as exc:
        print(f"unibrain train: checkpoint error: {exc}", file=sys.stderr)
        return 3
    except UniBrainError as exc:
        print(f"unibrain train: {exc}", file=sys.stderr)
        return 2
    last = result.losses[-1] if result.losses else {}
    print(f"finished at step {result.steps}; last loss {last.get('loss')}; "
          f"exported {result.export_dir}" if result.export_dir else f"stopped at step {result.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
