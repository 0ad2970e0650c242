"""hf_gpam.training: which parameters weight decay applies to (λ never, W⁻ only on request), for plain models,
PEFT-wrapped ones and plain PyTorch optimizers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Trainer

from hf_gpam.testing_utils import tiny_gpam_config
from hf_gpam.training import gpam_decay_parameter_names, gpam_optimizer_groups


def tiny_model(model_type="gpt2", **gpam_options):
    auto_class = AutoModelForCausalLM if model_type == "gpt2" else AutoModelForSeq2SeqLM
    return auto_class.from_config(tiny_gpam_config(model_type, **gpam_options))


def stock_rule(model) -> set[str]:
    # what transformers' Trainer decays without hf_gpam's rule, λ and W⁻ included; its list also names tied
    # copies (lm_head.weight) that named_parameters() does not yield, so compare on the parameters themselves
    return set(Trainer.get_decay_parameter_names(None, model)) & {name for name, _ in model.named_parameters()}


def gpam_names(model, kind: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if f".{kind}." in name}


@pytest.mark.parametrize("model_type", ["gpt2", "bart", "marian"])
@pytest.mark.parametrize("gpam_weight_decay", [False, True], ids=["w_neg_no_decay", "w_neg_decay"])
def test_lambda_never_decays_and_w_neg_follows_the_option(model_type, gpam_weight_decay):
    model = tiny_model(model_type, gpam_tie_lambda=False)
    lambdas, w_negs = gpam_names(model, "gpam_lambda"), gpam_names(model, "gpam_q_neg")
    assert lambdas and w_negs
    # the defect: the stock rule decays both daGPAM parameters
    assert lambdas <= stock_rule(model) and w_negs <= stock_rule(model)

    names = gpam_decay_parameter_names(model, gpam_weight_decay=gpam_weight_decay)
    expected = stock_rule(model) - lambdas - (set() if gpam_weight_decay else w_negs)
    assert set(names) == expected
    # in named_parameters order, as Trainer.get_decay_parameter_names returns them
    assert names == [name for name, _ in model.named_parameters() if name in expected]


def test_default_is_no_decay_for_w_neg():
    model = tiny_model()
    assert gpam_decay_parameter_names(model) == gpam_decay_parameter_names(model, gpam_weight_decay=False)


def test_optimizer_groups_cover_each_trainable_parameter_once():
    # a fixed λ is a buffer, not a parameter: it must not appear, nor break the groups
    model = tiny_model(gpam_lambda_trainable=False)
    model.transformer.wpe.weight.requires_grad_(False)
    groups = gpam_optimizer_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.wte.weight" in decayed
    assert not any("gpam_" in n or n.endswith(".bias") or ".ln_" in n for n in decayed)
    torch.optim.AdamW(groups, lr=1e-3)


def test_peft_wrapped_model_follows_the_same_rule():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model(),
        LoraConfig(target_modules=["c_attn", "gpam_q_neg"], modules_to_save=["gpam_lambda"], fan_in_fan_out=True),
    )
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lambda_copies = {n for n in trainable if ".gpam_lambda.modules_to_save." in n}
    w_neg_adapters = {n for n in trainable if ".gpam_q_neg.lora_" in n}
    assert lambda_copies and w_neg_adapters

    without = set(gpam_decay_parameter_names(model))
    assert not without & (lambda_copies | w_neg_adapters)
    assert {n for n in trainable if ".c_attn.lora_" in n} <= without
    with_w_neg = set(gpam_decay_parameter_names(model, gpam_weight_decay=True))
    assert w_neg_adapters <= with_w_neg and not with_w_neg & lambda_copies
