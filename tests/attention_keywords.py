"""The keywords stock transformers hands to attention functions, observed on the installed release, and the record of
what each release of the verified range hands on (``tests/fixtures/attention_keywords.json``).

A keyword one release passes and another does not (``cache``: 5.19-5.23 hand continuous batching's paged cache to the
attention function, 5.24+ take it in the attention module) must have a policy whichever release is installed, so
tests/test_contract.py checks the policy against every release's record, not only the installed one's walk.
``scripts/compat.py`` refreshes the record in each release's venv:

    python -m tests.attention_keywords --update tests/fixtures/attention_keywords.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch


RECORD = Path(__file__).resolve().parent / "fixtures" / "attention_keywords.json"
# the loss types of the heads in the table (causal LMs, sequence classifiers; BART and Marian compute their own)
TABLE_LOSS_TYPES = ("ForCausalLM", "ForSequenceClassification")


def declared_keywords() -> set[str]:
    """Every keyword a stock forward can hand on to its attention function by declaration: the TypedDicts' keys and
    the optional keywords of the loss functions of the table's heads (loss keywords travel with **kwargs)."""
    from transformers.loss.loss_utils import LOSS_MAPPING
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    from transformers.utils.generic import TransformersKwargs

    names = set(TransformersKwargs.__annotations__) | set(FlashAttentionKwargs.__annotations__)
    for loss_type in TABLE_LOSS_TYPES:
        for name, parameter in inspect.signature(LOSS_MAPPING[loss_type]).parameters.items():
            if parameter.default is not inspect.Parameter.empty and parameter.kind is not parameter.VAR_KEYWORD:
                names.add(name)
    return names


class KeywordSpy:
    """A registered attention backend that records the keywords it receives and runs the stock eager function of
    the module's own modeling file with them."""

    def __init__(self):
        self.seen = set()

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.seen.update(kwargs)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)


def observed_keywords() -> set[str]:
    """The keywords that reach attention functions on the installed release: forwards with every output, loss and
    packing keyword, generate (with a tokenizer), an encoder-decoder's generate, attention sinks, and continuous
    batching (``generate_batch``)."""
    from transformers import AttentionInterface, ContinuousBatchingConfig, DataCollatorWithFlattening, GenerationConfig
    from transformers import GptOssConfig
    from transformers import GptOssForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from .utils import stock_model

    spy = KeywordSpy()
    AttentionInterface.register("keyword_spy", spy)
    AttentionMaskInterface.register("keyword_spy", eager_mask)
    ids = torch.randint(3, 90, (2, 8))
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": list(range(3, 9))}, {"input_ids": list(range(3, 7))}]
    )
    for model_type in ("llama", "mistral", "gemma2"):
        model = stock_model(model_type, attn_implementation="keyword_spy")
        model(
            ids, labels=ids, shift_labels=ids, ignore_index=-100, num_items_in_batch=torch.tensor(8), is_causal=True,
            output_attentions=True, output_hidden_states=True, output_router_logits=True, use_cache=True,
        )
        model(**packed, use_cache=False)
    # generate(..., tokenizer=) keeps the tokenizer among the model keywords (transformers serve passes one)
    stock_model("llama", attn_implementation="keyword_spy").generate(
        ids, max_new_tokens=2, do_sample=False, tokenizer=object(), pad_token_id=1,
    )
    # an encoder-decoder's generate(**batch) hands the labels to its encoder (Seq2SeqTrainer.predict)
    bart = stock_model("bart", attn_implementation="keyword_spy")
    bart.generate(input_ids=ids, labels=ids, max_new_tokens=2, do_sample=False)
    # attention sinks: GPT-OSS, which patch_model(allow_untested=True) can reach
    oss = GptOssForCausalLM(GptOssConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=32, num_local_experts=2, num_experts_per_tok=1, vocab_size=96,
        layer_types=["full_attention"], attn_implementation="keyword_spy",
    ))
    oss(ids)

    # continuous batching: its name check accepts "sdpa" only, so the spy stands in for stock sdpa there
    def sdpa_spy(module, query, key, value, attention_mask, **kwargs):
        spy.seen.update(kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    mapping = AttentionInterface._global_mapping
    stock_sdpa = mapping["sdpa"]
    mapping["sdpa"] = sdpa_spy
    try:
        # a small paged cache: the default one is sized from the free memory (some releases take most of it)
        stock_model("llama", attn_implementation="sdpa").generate_batch(
            inputs=[[3, 4, 5], [6, 7]], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False),
            continuous_batching_config=ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=64),
        )
    finally:
        mapping["sdpa"] = stock_sdpa
    return spy.seen


def recorded_keywords() -> dict[str, list[str]]:
    """transformers release -> the keywords its walk observed (the record's ``observed``) and declared."""
    return json.loads(RECORD.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", type=Path, default=None, help="the record to merge this release's entry into")
    args = parser.parse_args(argv)
    import transformers

    entry = {"observed": sorted(observed_keywords()), "declared": sorted(declared_keywords())}
    if args.update is None:
        print(json.dumps({transformers.__version__: entry}, indent=1))
        return 0
    record = json.loads(args.update.read_text()) if args.update.is_file() else {}
    record[transformers.__version__] = entry
    args.update.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")
    print(f"{args.update}: transformers {transformers.__version__}: {len(entry['observed'])} keywords observed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
