"""`raytp plan`: how a model would be split over devices, from the budgets given (no Ray, no weights read)."""

from __future__ import annotations

import json

from raytp.cli.common import UserError
from raytp.parallel.devices import DeviceSpec, is_auto, parse_devices


def _this_machine() -> list[DeviceSpec]:
    """`--devices auto` without Ray: every GPU here with the free memory its rank would plan with, else one cpu rank
    with this machine's available memory."""
    import psutil
    import torch

    from raytp.actors.group import GPU_RESERVE

    def mib(n: float) -> int:  # whole MiB: the table names the budget it used, e.g. cpu@19957MiB
        return int(n) // 2**20 * 2**20

    gpus = torch.cuda.device_count()
    if gpus == 0:
        return [DeviceSpec("cpu", None, mib(psutil.virtual_memory().available))]
    return [DeviceSpec("cuda", i, mib(torch.cuda.mem_get_info(i)[0] * GPU_RESERVE)) for i in range(gpus)]


def cmd_plan(args) -> None:
    from raytp.model.pieces import plan_model, plan_with_draft
    from raytp.weights.source import ModelSource

    devices = _this_machine() if is_auto(args.devices) else parse_devices(args.devices)
    missing = [str(d) for d in devices if d.mem_bytes is None]
    if missing:
        raise UserError(f"`raytp plan` reads no hardware: give every device a budget (@MEM), e.g. cpu@2GiB; "
                        f"these have none: {', '.join(missing)}")
    bandwidths = [d.bandwidth for d in devices] if all(d.bandwidth for d in devices) else None
    if args.split == "speed" and bandwidths is None:
        raise UserError("`raytp plan --split speed` needs every device's bandwidth: add ~RATE to each device, "
                        "e.g. cuda:0@24GiB~0.94TB/s")

    config = ModelSource.parse(args.model).config()
    draft = None if args.draft_model is None else ModelSource.parse(args.draft_model).config()

    def plan_for(split: str | None):
        """(the model's plan, the draft model's or None)."""
        budgets = [(str(d), d.mem_bytes) for d in devices]
        shape = dict(max_context=args.max_context, max_batch=args.max_batch, dtype=args.dtype, bandwidths=bandwidths,
                     split=split, kv_dtype=args.kv_dtype)
        return (plan_model(config, budgets, **shape), None) if draft is None else \
            plan_with_draft(config, draft, budgets, **shape)

    plan, draft_plan = plan_for(args.split)
    if args.json:
        extra = {} if draft_plan is None else {"draft_plan": draft_plan.to_dict()}
        print(json.dumps(plan.to_dict() | extra, indent=2))
        return
    print(plan.format_table())
    print(plan.describe_pieces())
    if draft_plan is not None:  # the budgets above are what each device has left beside it
        print(f"draft model {args.draft_model}:")
        print(draft_plan.format_table())
    if bandwidths is not None:  # both splits' predicted batch-1 decode step, side by side
        for split in ("memory", "speed"):
            other, _ = plan_for(split)
            print(f"{split} split: predicted step {1000 * other.step_seconds:.2f} ms (weights / bandwidth), rank "
                  f"{other.pacing_rank} paces it" + (" <- this plan" if split == plan.split else ""))
