"""MTP drafting (eager: the model's verify forwards return hidden states, the MTP layer runs its own steps) between
decode steps replayed from CUDA graphs gives the tokens of plain graphed decoding (GPU host only), on a tiny Qwen3.5
whose MTP layer is the model itself, so that most tokens come from verify steps."""

import dataclasses

import pytest
import torch

from tests.gpu.test_graphed_decode import PARAMS, generate
from tests.test_mtp_drafter import save_model_whose_mtp_layer_is_itself

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["hoststaged", "nccl"])
def test_mtp_drafting_between_graphed_steps_gives_the_plain_tokens(backend, tmp_path):
    save_model_whose_mtp_layer_is_itself(tmp_path)
    drafting = [dataclasses.replace(p, speculate=f"mtp:{k}") for p, k in zip(PARAMS, (4, 2, 8, 3))]
    drafting[1] = PARAMS[1]  # a row that does not draft, beside the others
    model = str(tmp_path)
    assert generate(True, backend, model=model, params=drafting) == generate(True, backend, model=model)
