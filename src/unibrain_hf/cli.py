"""The ``unibrain`` command: one entry point, one sub-command per job.

    unibrain --help
    unibrain phantom out/cohort --subjects 8 --seed 0
    unibrain convert path/to/BAGEL-7B-MoT path/to/unibrain-converted
    unibrain cache-latents --pipeline runs/align/pipeline --data out/cohort --stage unified --threads 2

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``unibrain --help`` stays fast. Every sub-command takes ``--threads N`` (torch intra-op threads;
default: the cores this process may use, see :mod:`unibrain_hf.utils.threads`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("unibrain_hf.convert.cli", "convert a BAGEL / UniBrain checkpoint into this package's format"),
    "phantom": ("unibrain_hf.data.phantom_cli", "write a synthetic multi-contrast brain MRI cohort"),
    "prepare": ("unibrain_hf.data.prepare_cli", "convert NIfTI folders + reports into the RadGenome parquet schema"),
    "eval": ("unibrain_hf.evaluation.cli", "evaluate a pipeline on a cohort (generation / diagnosis / unified)"),
    "demo": ("unibrain_hf.demo", "the main job: phantom cohort -> 3-stage training -> evaluation report"),
    "cache-latents": ("unibrain_hf.data.latent_cache_cli",
                      "encode a cohort's training images with the frozen VAE once (latent cache for training)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="unibrain", description="UniBrain brain-MRI model tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, (_, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command_parser = parsers[argv[0]]
    module.add_arguments(command_parser)
    if "--threads" not in command_parser._option_string_actions:  # a command may define its own
        command_parser.add_argument("--threads", type=int, default=None, metavar="N",
                                    help="torch intra-op threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    from .errors import InvalidInputError
    from .utils.threads import configure_threads

    try:
        configure_threads(args.threads, what="--threads")
    except InvalidInputError as exc:
        command_parser.error(str(exc))
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
