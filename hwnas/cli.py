"""Command line: argparse subcommands -> config dataclasses -> library calls."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _info(args: argparse.Namespace) -> int:
    """Print kernel backends, the device fingerprint and library versions."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    import hwnas
    from hwnas.kernels import available_backends, backend
    from hwnas.profiling.fingerprint import device_fingerprint

    info = {
        "hwnas": hwnas.__version__,
        "kernel_backends": available_backends(),
        "default_backend": {"cpu": backend("cpu"), "cuda": backend("cuda")},
        "cuda_available": torch.cuda.is_available(),
        "device": device_fingerprint(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("info", help="kernel backends, device fingerprint, versions").set_defaults(handler=_info)


# Each entry adds one subcommand; its parser sets `handler`.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    """The `hwnas` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="hwnas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hwnas` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"hwnas {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
