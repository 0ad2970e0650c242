"""torch.compile(fullgraph=True) of daGPAM training steps: no graph breaks, and the losses of eager mode.

``fullgraph=True`` turns any graph break into an error, so these tests fail if anything on the daGPAM path (the
attention ops, the λ module, the loss selection of ``GpamGPT2LMHeadModel``) stops being traceable.
"""

from __future__ import annotations

import pytest
import torch

import hf_gpam
from hf_gpam.testing_utils import tiny_gpam_config


STEPS = 3


def _training_losses(attn_implementation: str, backend: str | None) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    config = tiny_gpam_config("gpt2", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, gpam_lambda_init=0.3)
    config._attn_implementation = attn_implementation
    model = hf_gpam.GpamGPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))

    def loss_of(input_ids):
        return model(input_ids=input_ids, labels=input_ids).loss

    step = loss_of if backend is None else torch.compile(loss_of, fullgraph=True, backend=backend)
    losses = []
    for _ in range(STEPS):
        loss = step(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.transformer.h[0].attn.gpam_lambda.weight.detach().clone()


def _check_compiled_matches_eager(attn_implementation: str, backend: str) -> None:
    torch._dynamo.reset()
    eager_losses, eager_lambda = _training_losses(attn_implementation, backend=None)
    compiled_losses, compiled_lambda = _training_losses(attn_implementation, backend=backend)
    # several optimizer steps: the losses after the first also check that the compiled backward moved the
    # weights exactly as the eager backward did
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-5)
    # AdamW normalises each update to about lr = 1e-2, so float-rounding differences of the λ gradient show up
    # at 1e-5 relative to that; a wrong λ gradient would be off by the size of an update
    torch.testing.assert_close(compiled_lambda, eager_lambda, rtol=0, atol=1e-4)
    assert eager_losses[-1] < eager_losses[0], "the training steps should lower the loss"
    assert (eager_lambda - 0.3).abs().min() > 1e-3, "every head's λ should have been trained"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_traced_training_steps_have_no_graph_break(attn_implementation):
    # aot_eager traces forward and backward with fullgraph=True (any graph break raises) without code generation,
    # which keeps this check fast enough for the default run
    _check_compiled_matches_eager(attn_implementation, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_inductor_training_steps_match_eager_mode(attn_implementation):
    _check_compiled_matches_eager(attn_implementation, backend="inductor")
