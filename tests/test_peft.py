"""PEFT: LoRA on the attention projections and W⁻, λ trained through modules_to_save, adapters disabled give the
base model back, and merging gives a plain GPAM model."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from .utils import MODEL_TYPES, gpam_model, main_output, model_inputs, sharpen_attention


TARGETS = {"gpt2": ["c_attn", "gpam_q_neg"], "bart": ["q_proj", "v_proj", "gpam_q_neg"]}
TARGETS["marian"] = TARGETS["bart"]


def labels_of(inputs):
    return inputs.get("decoder_input_ids", inputs["input_ids"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_trains_lambda_and_merges_into_a_gpam_model(model_type):
    model = sharpen_attention(gpam_model(model_type, gpam_lambda_init=0.5))
    inputs = model_inputs(model_type)
    with torch.no_grad():
        base_output = main_output(model(**inputs)).clone()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model_type], modules_to_save=["gpam_lambda"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config).train()
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("gpam_lambda.modules_to_save" in n for n in trainable)
    assert any("gpam_q_neg.lora_A" in n for n in trainable)

    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        peft_model(**inputs, labels=labels_of(inputs)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        adapted = main_output(peft_model(**inputs)).clone()
        with peft_model.disable_adapter():
            disabled = main_output(peft_model(**inputs))
    # adapters (LoRA and the trained λ copy) disabled: exactly the base model
    torch.testing.assert_close(disabled, base_output, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(adapted, base_output, atol=1e-4)

    merged = peft_model.merge_and_unload()
    assert type(merged) is type(model)
    lambdas = [m.gpam_lambda.weight for m in merged.gpam_modules()]
    assert any(not torch.allclose(lam, torch.full_like(lam, 0.5)) for lam in lambdas), "λ did not train"
    with torch.no_grad():
        torch.testing.assert_close(main_output(merged(**inputs)), adapted, atol=1e-5, rtol=1e-5)
