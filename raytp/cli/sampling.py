"""The sampling flags of `generate` and `chat` as the SamplingParams every request carries."""

from __future__ import annotations

DEFAULT_MAX_TOKENS = 256


def sampling_params(args):
    """The sampling flags as SamplingParams: bad values fail here with the rule they break, as in the API."""
    from raytp.runtime.sampling import SamplingParams

    max_tokens = args.max_tokens if args.max_tokens is not None else min(DEFAULT_MAX_TOKENS, args.max_context // 2)
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=max_tokens,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)
