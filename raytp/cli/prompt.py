"""`raytp generate`'s prompt as token ids, made before Ray starts: text through the model's tokenizer (and chat
template with --chat), or ids given with --prompt-ids (a synthetic model has no tokenizer). Checked as the driver
checks every request (raytp.runtime.requests.check_request), so a prompt the context cannot hold costs a second."""

from __future__ import annotations

from raytp.cli.common import UserError


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise UserError(f"--prompt-ids takes comma-separated token ids, e.g. --prompt-ids 1,2,3; got {text!r}")
    return ids


def prompt_ids(args) -> list[int]:
    """The ids of --prompt (with --chat as the user's message) or of --prompt-ids."""
    from raytp.weights.source import ModelSource
    from raytp.weights.tokenizer import Tokenizer

    if args.prompt_ids is not None:
        if args.chat:
            raise UserError("--chat wraps a text in the model's chat template; --prompt-ids are sent as they are: "
                            "give --prompt TEXT with --chat, or leave --chat out")
        return parse_prompt_ids(args.prompt_ids)
    source = ModelSource.parse(args.model)
    if source.tokenizer_dir is None:
        raise UserError(f"{args.model} is synthetic and has no tokenizer: give the prompt as token ids instead of "
                        "--prompt, e.g. --prompt-ids 1,2,3")
    tokenizer = Tokenizer.from_dir(source.tokenizer_dir)
    try:
        if args.chat:
            return tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        return tokenizer.encode(args.prompt)
    except ValueError as e:  # a model without a chat template
        raise UserError(str(e)) from None


def check_prompt(ids: list[int], params, config, args) -> None:
    """Refuse ids the driver would refuse: out of the vocabulary, or with max_tokens more than the context holds."""
    from raytp.runtime.requests import check_request

    try:
        check_request(ids, params, (), config.vocab_size, args.max_context, args.max_batch)
    except ValueError as e:
        raise UserError(str(e)) from None
