"""The sampling flags of `generate` and `chat` as the SamplingParams every request carries; a flag left out takes
the model's own default (its generation_config.json, raytp.weights.generation_defaults), else greedy."""

from __future__ import annotations

from raytp.cli.common import UserError

DEFAULT_MAX_TOKENS = 256


def model_defaults(model: str):
    """The SamplingDefaults of `model` (checked: a value out of range is refused naming the file)."""
    from raytp.runtime.sampling import SamplingParams
    from raytp.weights.generation_defaults import SamplingDefaults
    from raytp.weights.source import ModelSource

    try:
        defaults = SamplingDefaults.read(ModelSource.parse(model).path)
    except ValueError as e:  # names the file
        raise UserError(str(e)) from None
    try:
        SamplingParams(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                       repetition_penalty=defaults.repetition_penalty)
    except ValueError as e:
        raise UserError(f"{defaults.source}: {e}; fix or delete that file") from None
    return defaults


def sampling_params(args, defaults):
    """The sampling flags as SamplingParams, `defaults` (SamplingDefaults) where a flag is left out: bad values fail
    here with the rule they break, as in the API."""
    from raytp.runtime.sampling import SamplingParams

    def flag(name: str):
        value = getattr(args, name)
        return getattr(defaults, name) if value is None else value

    max_tokens = args.max_tokens if args.max_tokens is not None else min(DEFAULT_MAX_TOKENS, args.max_context // 2)
    return SamplingParams(temperature=flag("temperature"), top_p=flag("top_p"), top_k=flag("top_k"),
                          max_tokens=max_tokens, repetition_penalty=flag("repetition_penalty"), seed=args.seed,
                          speculate=args.speculate)
