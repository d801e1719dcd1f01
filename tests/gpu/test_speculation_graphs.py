"""Verify steps (eager, k + 1 positions per row) between decode steps replayed from CUDA graphs give the tokens of
plain graphed decoding (GPU host only): the device batch is rewritten after each verify step, and the Triton decode
attention of the graphed steps reads the cache the verify steps' torch attention wrote; likewise with a draft model
(eager) drafting on the same GPU and communicator."""

import dataclasses

import pytest
import torch

from tests.gpu.test_graphed_decode import PARAMS, generate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["hoststaged", "nccl"])
def test_speculating_rows_between_graphed_steps_give_the_plain_tokens(backend):
    drafting = [dataclasses.replace(p, speculate=f"ngram:{k}") for p, k in zip(PARAMS, (4, 2, 8, 3))]
    drafting[1] = PARAMS[1]  # a row that does not draft, beside the others
    assert generate(True, backend, params=drafting) == generate(True, backend)


@pytest.mark.parametrize("backend", ["hoststaged", "nccl"])
def test_a_draft_model_between_graphed_steps_gives_the_plain_tokens(backend):
    """The draft is the model itself: nearly every draft is accepted, so most tokens come from verify steps."""
    drafting = [dataclasses.replace(p, speculate=f"draft:{k}") for p, k in zip(PARAMS, (4, 2, 8, 3))]
    drafting[1] = PARAMS[1]  # a row that does not draft, beside the others
    assert generate(True, backend, params=drafting, draft="synthetic:tiny") == generate(True, backend)
