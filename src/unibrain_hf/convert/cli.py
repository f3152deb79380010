"""``unibrain convert SRC DST``: BAGEL-format checkpoint directory → UniBrain pipeline directory.

    unibrain convert /path/to/BAGEL-7B-MoT out/unibrain-bagel
    unibrain convert /path/to/BAGEL-7B-MoT out/unibrain-s3 --weights checkpoints_s3/0000200/ema.safetensors --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

from ..utils.cli_types import positive_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="BAGEL directory (llm_config.json, vit_config.json, ae.safetensors, tokenizer, weights)")
    parser.add_argument("dst", help="output pipeline directory (must not exist unless --overwrite)")
    parser.add_argument("--weights", help="take the model weights from this safetensors file (e.g. a UniBrain checkpoint)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size-gb", type=positive_float, default=5.0, help="size of each model shard (GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")


#: convert_bagel_checkpoint's option -> this command's flag, for error messages.
FLAG_HINTS = {"overwrite": "--overwrite", "weights": "--weights FILE"}


def run(args) -> int:
    from ..errors import ConversionError, UniBrainError
    from .convert_bagel import OPTION_HINTS, convert_bagel_checkpoint

    try:
        report = convert_bagel_checkpoint(args.src, args.dst, weights=args.weights, dtype=args.dtype,
                                          max_shard_size=int(args.max_shard_size_gb * 1024 ** 3),
                                          overwrite=args.overwrite)
    except UniBrainError as exc:
        message = str(exc)
        option = getattr(exc, "option", None) if isinstance(exc, ConversionError) else None
        if option in FLAG_HINTS:
            message = message.replace(f"pass {OPTION_HINTS[option]}", f"pass {FLAG_HINTS[option]}")
        elif option == "weights_file":  # the reader named the Python argument; name the flag instead
            message = message.replace("weights (", "--weights (", 1)
        print(f"unibrain convert: error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {report.destination}: {report.num_tensors} tensors, {report.total_bytes / 1e6:.1f} MB; "
          f"special tokens {report.special_token_ids}; dropped {len(report.dropped)} recomputed/unused tensors")
    return 0
