"""GGUF bases: tiny GGUF files written here with the ``gguf`` package (float32 tensors, nothing downloaded), loaded
by transformers' GGUF loader, and taken through every daGPAM path: ``patch_model``, ``GpamXxx.from_pretrained(...,
gguf_file=...)``, ``hf-gpam convert --gguf_file`` and the causal-LM recipe's ``--gguf_file``. The checkpoints they
write are ordinary safetensors with no GGUF tag, and load with ``trust_remote_code`` where hf_gpam is absent."""

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_gpam
from hf_gpam.modeling.gpam_gguf import drop_gguf_tag, is_gguf_tagged
from hf_gpam.testing_utils import tiny_stock_config

from .utils import remote_causal_logits


gguf = pytest.importorskip("gguf", reason="the gguf package reads and writes GGUF files: pip install -e '.[gguf]'")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the table's families whose GGUF architecture transformers reads (transformers.integrations.ggml's
# GGUF_CONFIG_MAPPING); gpt_neox, opt, olmo2, bart and marian have none
GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma2", "gemma3_text"]
# GGUF's architecture names where they differ from the model types (Mistral files say "llama")
GGUF_ARCHITECTURE = {"mistral": "llama", "gemma3_text": "gemma3"}
GGUF_FILE = "tiny.gguf"


def _gguf_name_map(architecture: str, num_layers: int):
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    return gguf.get_tensor_name_map(arch, num_layers)


def _to_gguf_layout(name: str, weight: np.ndarray, architecture: str, config) -> np.ndarray:
    """The inverse of what transformers' tensor processors undo when they read a GGUF file (llama.cpp's own
    conversion): Llama's rotary layout of q/k rows, GPT-2's transposed Conv1D weights, Gemma's norm weights + 1."""
    if architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape
        )
    if architecture == "gpt2" and any(
        key in name for key in ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")
    ):
        return weight.T.copy()
    if architecture in ("gemma2", "gemma3") and "norm.weight" in name:
        return weight + 1
    return weight


def write_tiny_gguf(model, path, model_type: str) -> None:
    """Write ``model`` (a stock causal LM) to ``path`` as a float32 GGUF file the way llama.cpp lays one out."""
    config = model.config
    architecture = GGUF_ARCHITECTURE.get(model_type, model_type)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-mistral" if model_type == "mistral" else f"tiny-{model_type}")
    text = config.get_text_config()
    if model_type == "gpt2":
        writer.add_uint32("gpt2.block_count", text.n_layer)
        writer.add_uint32("gpt2.context_length", text.n_positions)
        writer.add_uint32("gpt2.embedding_length", text.n_embd)
        writer.add_uint32("gpt2.feed_forward_length", 4 * text.n_embd)
        writer.add_uint32("gpt2.attention.head_count", text.n_head)
        writer.add_float32("gpt2.attention.layer_norm_epsilon", text.layer_norm_epsilon)
    else:
        prefix = architecture
        writer.add_uint32(f"{prefix}.block_count", text.num_hidden_layers)
        writer.add_uint32(f"{prefix}.context_length", text.max_position_embeddings)
        writer.add_uint32(f"{prefix}.embedding_length", text.hidden_size)
        writer.add_uint32(f"{prefix}.feed_forward_length", text.intermediate_size)
        writer.add_uint32(f"{prefix}.attention.head_count", text.num_attention_heads)
        writer.add_uint32(f"{prefix}.attention.head_count_kv", text.num_key_value_heads)
        writer.add_float32(f"{prefix}.attention.layer_norm_rms_epsilon", text.rms_norm_eps)
        writer.add_uint32(f"{prefix}.vocab_size", text.vocab_size)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if architecture == "llama":
            writer.add_uint32(f"{prefix}.rope.dimension_count", head_dim)
        if architecture in ("gemma2", "gemma3"):
            writer.add_uint32(f"{prefix}.attention.key_length", head_dim)
    writer.add_token_list([f"t{i}" for i in range(text.vocab_size)])
    writer.add_bos_token_id(text.bos_token_id)
    writer.add_eos_token_id(text.eos_token_id)
    writer.add_pad_token_id(text.pad_token_id)
    name_map = _gguf_name_map(architecture, text.num_hidden_layers)
    written = 0
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            # GPT-2's causal-mask buffers and tied output weights have no GGUF tensor
            continue
        name = f"{gguf_name}.{suffix}"
        weight = _to_gguf_layout(name, tensor.detach().float().numpy(), architecture, text)
        writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))
        written += 1
    assert written >= 4 * text.num_hidden_layers, f"only {written} tensors mapped to GGUF names"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_folders(tmp_path_factory):
    """{model_type: folder holding tiny.gguf}, written once per module."""
    folders = {}
    for model_type in GGUF_FAMILIES:
        # what the GGUF metadata does not carry keeps transformers' defaults on load (Mistral's window, Qwen3's head_dim,
        # GPT-2's n_positions), so the tiny models use those values
        overrides = {"mistral": {"sliding_window": None}, "qwen3": {"head_dim": 128}, "gpt2": {"n_positions": 1024}}.get(
            model_type, {}
        )
        config = tiny_stock_config(model_type, **overrides)
        torch.manual_seed(0)
        stock = AutoModelForCausalLM.from_config(config).eval()
        folder = tmp_path_factory.mktemp(f"gguf_{model_type}")
        write_tiny_gguf(stock, folder / GGUF_FILE, model_type)
        folders[model_type] = folder
    return folders


def token_ids(vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (2, 7), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def load_stock(folder):
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE).eval()


def test_the_tiny_gguf_writer_round_trips_a_llama_exactly(tmp_path):
    # what the other tests rely on: the file holds the model it was written from, q/k rotary layout included
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_stock_config("llama")).eval()
    write_tiny_gguf(stock, tmp_path / GGUF_FILE, "llama")
    loaded = load_stock(tmp_path)
    inputs = token_ids(stock.config.vocab_size)
    torch.testing.assert_close(logits(loaded, inputs), logits(stock, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", GGUF_FAMILIES)
def test_patch_model_accepts_a_dequantized_gguf_model_and_keeps_its_outputs(gguf_folders, model_type):
    stock = load_stock(gguf_folders[model_type])
    # transformers tags the dequantized model as GGUF-quantized; without the fix patch_model refused it
    assert is_gguf_tagged(stock)
    inputs = token_ids(stock.config.vocab_size)
    before = logits(stock, inputs)
    model = hf_gpam.patch_model(stock)
    assert hf_gpam.is_gpam_model(model)
    assert not is_gguf_tagged(model) and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2"])
def test_gpam_class_from_pretrained_reads_a_gguf_file(gguf_folders, model_type, tmp_path):
    folder = gguf_folders[model_type]
    stock = load_stock(folder)
    inputs = token_ids(stock.config.vocab_size)
    gpam_class = type(hf_gpam.patch_model(load_stock(folder)))
    model, info = gpam_class.from_pretrained(
        folder, gguf_file=GGUF_FILE, gpam_lambda_init=0.0, output_loading_info=True
    )
    assert type(model) is gpam_class and model.config.model_type == f"gpam_{model_type}"
    # the only missing weights are exactly daGPAM's new ones
    gpam_keys = {name for name, _ in model.named_parameters() if ".gpam_" in name}
    assert gpam_keys and set(info["missing_keys"]) == gpam_keys
    assert not is_gguf_tagged(model)
    torch.testing.assert_close(logits(model, inputs), logits(stock, inputs), rtol=0, atol=1e-5)
    # λ ≠ 0 changes the outputs: the daGPAM modules are really in the forward
    lambdas = gpam_class.from_pretrained(folder, gguf_file=GGUF_FILE, gpam_lambda_init=0.5)
    assert (logits(lambdas, inputs) - logits(stock, inputs)).abs().max() > 1e-4


def test_saved_checkpoint_of_a_gguf_base_is_plain_safetensors_and_loads_without_hf_gpam(gguf_folders, tmp_path):
    folder = gguf_folders["llama"]
    model = hf_gpam.patch_model(load_stock(folder))
    with torch.no_grad():
        for index, module in enumerate(model.gpam_modules()):
            module.gpam_lambda.weight.fill_(0.2 * (index + 1))
    inputs = token_ids(model.config.vocab_size)
    expected = logits(model, inputs)
    out = tmp_path / "checkpoint"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["model_type"] == "gpam_llama"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf"))
    class_name, got = remote_causal_logits(out, inputs, tmp_path)
    assert class_name == "GpamLlamaForCausalLM"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_convert_cli_writes_a_daGPAM_folder_from_a_gguf_file(gguf_folders, tmp_path):
    from hf_gpam.cli import main as cli_main

    folder = gguf_folders["qwen2"]
    out = tmp_path / "converted"
    assert cli_main(["convert", str(folder), "--gguf_file", GGUF_FILE, "--output_dir", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "gpam_qwen2" and "quantization_config" not in saved
    stock = load_stock(folder)
    inputs = token_ids(stock.config.vocab_size)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(reloaded, inputs), logits(stock, inputs), rtol=0, atol=1e-5)
    # the folder's card names the file it was converted from
    assert GGUF_FILE in (out / "README.md").read_text()


def test_a_gguf_architecture_transformers_cannot_read_is_one_clear_error(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / GGUF_FILE), "gptneox")
    writer.add_uint32("gptneox.block_count", 1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"tiny\.gguf: GGUF model with architecture gptneox is not supported") as info:
        hf_gpam.GpamGPTNeoXForCausalLM.from_pretrained(tmp_path, gguf_file=GGUF_FILE)
    assert "\n" not in str(info.value)


def test_a_gguf_file_of_another_family_is_refused(gguf_folders):
    with pytest.raises(ValueError, match=r"tiny\.gguf: a 'qwen2' model, not a 'llama' one"):
        hf_gpam.GpamLlamaForCausalLM.from_pretrained(gguf_folders["qwen2"], gguf_file=GGUF_FILE)


def test_a_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gguf_file 'absent\.gguf': no such file"):
        hf_gpam.GpamLlamaForCausalLM.from_pretrained(tmp_path, gguf_file="absent.gguf")


def test_drop_gguf_tag_refuses_weights_still_packed(gguf_folders):
    model = load_stock(gguf_folders["llama"])
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="still packed GGUF blocks"):
        drop_gguf_tag(model)
    assert is_gguf_tagged(model)


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_clm_recipe_fine_tunes_a_gguf_base_with_lora_and_prints_its_closing_summary(tmp_path, capsys):
    from hf_gpam.data import stdlib_docstring_corpus, train_byte_level_bpe

    from .test_recipes import FAST, read_results, run_clm_gpam

    corpus = stdlib_docstring_corpus(max_chars=30_000)
    (tmp_path / "train.txt").write_text("\n".join(corpus[:-20]) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(corpus[-20:]) + "\n")
    tokenizer = train_byte_level_bpe(corpus, vocab_size=300)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(
        tiny_stock_config("llama", vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    )
    base = tmp_path / "base"
    base.mkdir()
    write_tiny_gguf(stock, base / GGUF_FILE, "llama")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_clm_gpam.main([
            "--model_name_or_path", str(base), "--gguf_file", GGUF_FILE, "--tokenizer_name", str(tmp_path / "tokenizer"),
            "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "validation.txt"),
            "--block_size", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_steps", "3",
            "--use_lora", "--lora_target_modules", "q_proj", "v_proj", "gpam_q_neg", "--merge_lora",
            "--chat_prompt", "Split the string.", "--chat_max_new_tokens", "4",
            "--do_train", "--do_eval", "--output_dir", str(out), *FAST,
        ])
    # the adapter is saved without PEFT probing the GGUF folder (or the Hub) for a config.json it cannot have
    assert not [w for w in caught if "Could not find a config file" in str(w.message)]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    results = read_results(out)
    assert results["init_eval_loss"] > results["eval_loss"]
    assert {"chat_answer_before", "chat_answer_after"} <= set(results)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "gpam_llama" and "quantization_config" not in saved
    # λ moved from 0: the LoRA run trained it through modules_to_save, and the merged folder holds it
    assert any(abs(v) > 0 for values in results["gpam_lambdas"].values() for v in values)
    printed = capsys.readouterr().out
    summary = printed[printed.index("=== run_clm_gpam: dagpam llama, 3 steps ==="):]
    assert f"held-out loss  {results['init_eval_loss']:.4f} -> {results['eval_loss']:.4f}" in summary
    assert "answer before" in summary and "layers.1.self_attn" in summary
    assert str(out.resolve()) in summary and f"hf-gpam serve {out}" in summary


def test_recipe_refuses_a_chat_prompt_without_a_chat_template_and_a_missing_gguf_file(tmp_path):
    from .test_recipes import FAST, run_clm_gpam

    with pytest.raises(FileNotFoundError, match=r"gguf_file 'absent\.gguf': no such file"):
        run_clm_gpam.main(["--model_name_or_path", str(tmp_path), "--gguf_file", "absent.gguf", "--do_train",
                           "--output_dir", str(tmp_path / "out"), *FAST])
    with pytest.raises(ValueError, match="--gguf_file needs --model_name_or_path"):
        run_clm_gpam.main(["--gguf_file", "x.gguf", "--model_type", "llama", "--output_dir", str(tmp_path / "o")])
    from hf_gpam.data import stdlib_docstring_corpus, train_byte_level_bpe

    from .test_recipes import gpam_recipe_utils

    tokenizer = train_byte_level_bpe(stdlib_docstring_corpus(max_chars=5_000), vocab_size=260)
    with pytest.raises(ValueError, match="--chat_prompt needs a tokenizer with a chat template"):
        gpam_recipe_utils.check_chat_template(tokenizer, "What is the capital of France?")
    tokenizer.chat_template = CHAT_TEMPLATE
    gpam_recipe_utils.check_chat_template(tokenizer, "What is the capital of France?")
