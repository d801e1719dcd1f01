"""`raytp pull`: download the embedded model (and quantize it) before any command needs it."""

from __future__ import annotations


def cmd_pull(args) -> None:
    from raytp.weights.smollm2 import pull_smollm2
    from raytp.weights.smollm2_quantized import pull_quantized_smollm2

    print(pull_quantized_smollm2(args.quant)[0] if args.quant else pull_smollm2())
