"""What the two daGPAM training recipes share: argument dataclasses, the start of ``main()`` (arguments, demo
defaults, logging, seed, checkpoint), model / tokenizer loading from the three sources (stock checkpoint, GPAM
checkpoint, from scratch), LoRA, checkpoint checks, the Trainer's weight-decay rule for λ and W⁻, data-file checks
and the Hub-ready output.

The recipes import this module from their own folder (``python recipes/run_clm_gpam.py`` puts ``recipes/`` on
``sys.path``); it uses only the public ``hf_gpam`` API.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    HfArgumentParser,
    Seq2SeqTrainer,
    Trainer,
    set_seed,
)
from transformers.pytorch_utils import Conv1D
from transformers.trainer_utils import get_last_checkpoint

import hf_gpam
from hf_gpam.architectures import model_types_for_task, supported_model_types
from hf_gpam.data import train_byte_level_bpe, train_marian_sentencepiece
from hf_gpam.hub import gpam_lambda_values, render_model_card, save_hub_ready
from hf_gpam.training import gpam_decay_parameter_names


logger = logging.getLogger(__name__)

# PEFT has no default LoRA targets for Marian or for the gpam_* model types: each row of the architecture table
# names its own (lora_targets). The daGPAM W⁻ (gpam_q_neg) is a target like those projections, and λ is trained in
# full through modules_to_save.
GPAM_LORA_TARGETS = ["gpam_q_neg"]
LORA_MODULES_TO_SAVE = ["gpam_lambda"]


def default_lora_targets(model_type: str) -> list[str]:
    """The default ``--lora_target_modules`` of a stock or GPAM model type: the row's ``lora_targets`` (its query and
    value projections, fused where the family fuses them; every projection of GPT-2, BART and Marian) and
    ``gpam_q_neg``."""
    return [*hf_gpam.ARCHITECTURES[model_type.removeprefix("gpam_")].lora_targets, *GPAM_LORA_TARGETS]


@dataclass
class GpamArguments:
    """The ``gpam_*`` config fields as recipe arguments (same names, same meaning; see the GPAM config classes).

    Used when the model is patched from a stock checkpoint or built from scratch. A GPAM checkpoint keeps the
    settings it was saved with.
    """

    gpam_mode: str = field(
        default="dagpam", metadata={"help": "'dagpam', or 'softmax' for the stock-attention baseline (same code path)."}
    )
    gpam_lambda_init: float | None = field(
        default=None,
        metadata={
            "help": "Initial λ. Default: 0.0 when patching a pretrained model (outputs unchanged), 0.5 from scratch."
        },
    )
    gpam_lambda_neg_init: float | None = field(
        default=None, metadata={"help": "Initial λ⁻ when --gpam_tie_lambda False (None: same as gpam_lambda_init)."}
    )
    gpam_tie_lambda: bool = field(
        default=True, metadata={"help": "Tie λ⁺ = λ⁻ (attention rows sum to exactly 1)."}
    )
    gpam_lambda_trainable: bool = field(default=True, metadata={"help": "Learn λ, or keep it fixed."})
    gpam_negative_init: str = field(
        default="neg_identity", metadata={"help": "Initial W⁻: 'neg_identity' (−I) or 'normal'."}
    )
    gpam_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Layer indices that use daGPAM, e.g. `--gpam_layers 0 1`; None means every layer."},
    )
    gpam_attention_types: list[str] = field(
        default_factory=lambda: ["self", "cross"],
        metadata={"help": "Attention kinds that use daGPAM (encoder-decoder models): self, cross."},
    )
    gpam_rope_variant: str = field(
        default="relative",
        metadata={
            "help": "RoPE families: 'relative' (Q⁻ = RoPE(ReLU(Q̃)W⁻), P⁻ depends on i − j only) or 'literal' "
            "(Q⁻ = ReLU(Q⁺)W⁻ from the rotated query). Ignored by GPT-2, BART, Marian and OPT."
        },
    )

    def options(self) -> dict:
        """The ``gpam_*`` keyword arguments for ``patch_model`` or a GPAM config; unset optional values omitted so
        that the library's own defaults apply."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if not (v is None and k in ("gpam_lambda_init", "gpam_layers"))}

    def explicitly_set(self) -> dict:
        """The options that differ from the recipe defaults."""
        defaults = GpamArguments()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


@dataclass
class ModelArguments:
    """Where the model and tokenizer come from, LoRA, and how the daGPAM parameters are decayed."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A stock checkpoint of a family in hf_gpam.ARCHITECTURES (patched with hf_gpam.patch_model) or "
            "a GPAM checkpoint (training continues); local folder or Hub id. Leave unset to train from scratch."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": f"Train from scratch: a model type of hf_gpam.ARCHITECTURES; causal LMs for run_clm_gpam "
            f"({supported_model_types('causal-lm')}), {supported_model_types('seq2seq-lm')} for run_translation_gpam."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From scratch: config fields, e.g. 'n_layer=2,n_embd=64,n_head=4' (GPT-2) or "
            "'num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_key_value_heads=2' (Llama). They are "
            "passed to the config's constructor, so fields derived from them (head_dim, layer_types) follow."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "Load --model_name_or_path from this GGUF file (its name in that folder or Hub repository, or a "
            "path), e.g. SmolLM2-135M-Instruct.Q4_1.gguf; transformers dequantizes it to float32 (needs the gguf "
            "package) and the tokenizer comes from the same file."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id (default: the checkpoint's, or one trained here)."}
    )
    tokenizer_vocab_size: int = field(
        default=2000, metadata={"help": "Vocabulary size of a tokenizer trained on the training data (from scratch)."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "'sdpa' (fused) or 'eager'."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit) to load."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow a checkpoint's own code. Not needed for GPAM checkpoints: hf_gpam is imported."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names (or suffixes) to adapt. Default: the architecture row's lora_targets (e.g. "
            "q_proj v_proj for Llama, qkv_proj for Phi-3, query_key_value for GPT-NeoX) and gpam_q_neg."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With --use_lora: merge the adapters and save a full model (adapter kept in adapter/)."},
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "Load the base model quantized, for QLoRA-style fine-tuning (needs --model_name_or_path and "
            "--use_lora): 'bnb-4bit' (bitsandbytes nf4 with double quantization), 'bnb-8bit' (bitsandbytes "
            "LLM.int8), 'torchao-int8' (torchao int8 weight-only). daGPAM's W⁻ and λ stay unquantized and train."
        },
    )
    bnb_4bit_compute_dtype: str = field(
        default="bfloat16",
        metadata={"help": "With --quantization bnb-4bit: the dtype the 4-bit layers compute in (bfloat16, float16, "
                          "float32)."},
    )
    gpam_weight_decay: bool = field(
        default=False,
        metadata={
            "help": "Apply --weight_decay to W⁻ (gpam_q_neg) too. Off by default: decay pulls W⁻ from −I toward 0, "
            "where the negative map is uniform. λ (gpam_lambda) is never decayed. See hf_gpam.training."
        },
    )

    def __post_init__(self):
        if self.model_type is not None and self.model_type not in hf_gpam.ARCHITECTURES:
            raise ValueError(
                f"--model_type {self.model_type!r} is not supported (supported: {', '.join(hf_gpam.ARCHITECTURES)})"
            )
        if self.model_type is not None and self.model_name_or_path is not None:
            raise ValueError("give either --model_name_or_path (a checkpoint) or --model_type (from scratch), not both")
        if self.config_overrides and self.model_name_or_path is not None:
            raise ValueError("--config_overrides only applies to a model trained from scratch (--model_type)")
        if self.gguf_file is not None and self.model_name_or_path is None:
            raise ValueError("--gguf_file needs --model_name_or_path (the folder or Hub repository holding the file)")
        if self.gguf_file is not None and self.quantization is not None:
            raise ValueError("--gguf_file loads dequantized float32 weights; --quantization cannot be combined with it")
        if self.merge_lora and not self.use_lora:
            raise ValueError("--merge_lora needs --use_lora")
        if self.quantization is not None:
            if self.quantization not in QUANTIZATION_METHODS:
                raise ValueError(
                    f"--quantization {self.quantization!r} is not one of {', '.join(QUANTIZATION_METHODS)}"
                )
            if self.model_name_or_path is None:
                raise ValueError("--quantization loads a pretrained base: give --model_name_or_path")
            if not self.use_lora:
                raise ValueError("--quantization trains adapters on a frozen quantized base: add --use_lora")
            if self.merge_lora:
                raise ValueError("--merge_lora cannot merge adapters into quantized weights; drop it (the adapter "
                                 "is saved) or train without --quantization")
        if self.bnb_4bit_compute_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--bnb_4bit_compute_dtype {self.bnb_4bit_compute_dtype!r} is not one of bfloat16, "
                             "float16, float32")


def parse_arguments(dataclass_types, argv, base_defaults: dict, demo_defaults: dict, is_demo):
    """Parse CLI flags or one JSON file into ``dataclass_types``.

    ``base_defaults`` always apply unless given (e.g. the output folder). When ``is_demo(parsed)`` says no model
    and no data were chosen, ``demo_defaults`` are applied as well (the embedded offline run); anything the user
    passed still wins, because their flags come after the defaults.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(dataclass_types)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # several processes without GPUs (e.g. `accelerate launch --multi_gpu` on a CPU machine): the Trainer only
        # sets up gloo DDP with use_cpu; otherwise every rank silently trains its own copy of the model alone
        base_defaults = {**base_defaults, "use_cpu": True}
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as handle:
            user = json.load(handle)
        parsed = parser.parse_dict({**base_defaults, **user})
        if is_demo(*parsed):
            parsed = parser.parse_dict({**base_defaults, **demo_defaults, **user})
        return parsed

    def as_flags(defaults: dict) -> list[str]:
        flags = []
        for key, value in defaults.items():
            values = value if isinstance(value, list) else [value]
            flags += [f"--{key}", *map(str, values)]
        return flags

    parsed = parser.parse_args_into_dataclasses(args=as_flags(base_defaults) + argv)
    if is_demo(*parsed):
        parsed = parser.parse_args_into_dataclasses(args=as_flags({**base_defaults, **demo_defaults}) + argv)
    return parsed


def is_demo(model_args, gpam_args, data_args, training_args) -> bool:
    """No model and no data were chosen: the recipe runs its embedded offline demo (and applies its defaults)."""
    no_model = model_args.model_name_or_path is None and model_args.model_type is None
    return no_model and data_args.dataset_name is None and data_args.train_file is None


def setup_logging(training_args) -> None:
    """Log to stdout at the Trainer's level for this process (``--log_level`` / ``--log_level_replica``).

    The recipe's own few lines (data source, model size and memory, LoRA targets, skipped rows) are shown at INFO
    on the main process unless ``--log_level`` was set: the user should see them before training starts, while
    transformers and datasets keep their quieter default.
    """
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    recipe_level = level
    if training_args.should_log and training_args.log_level == "passive":
        recipe_level = min(level, logging.INFO)
    # this module, the recipe run as a script, and the recipe imported as a module (tests)
    for name in (__name__, "__main__", "run_clm_gpam", "run_translation_gpam"):
        logging.getLogger(name).setLevel(recipe_level)
    import datasets
    import transformers

    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def start_run(data_arguments_class, training_arguments_class, argv, *, output_dir: str, demo_defaults: dict,
              supported: tuple[str, ...], task: str):
    """The start of every recipe's ``main()``.

    Parses the arguments (CLI flags or one JSON file; ``demo_defaults`` when no model and no data are given), sets
    up logging, lets each rank of a multi-process run say it is there, seeds, refuses an unsupported
    ``--model_type`` before any data is loaded or tokenizer trained, and finds the checkpoint to resume from.

    Returns:
        ``(model_args, gpam_args, data_args, training_args, checkpoint)``; ``checkpoint`` is None for a fresh run.
    """
    model_args, gpam_args, data_args, training_args = parse_arguments(
        (ModelArguments, GpamArguments, data_arguments_class, training_arguments_class),
        argv,
        base_defaults={"output_dir": output_dir},
        demo_defaults=demo_defaults,
        is_demo=is_demo,
    )
    setup_logging(training_args)
    if training_args.world_size > 1:
        # every rank says it is there (replica loggers are quiet by default)
        print(f"world size {training_args.world_size}, process {training_args.process_index}", flush=True)
    set_seed(training_args.seed)
    if model_args.model_type is not None:
        check_supported(model_args.model_type, supported, task)
    if model_args.gguf_file is not None:
        # before the tokenizer is read from the same file
        check_gguf_source(model_args.model_name_or_path, model_args.gguf_file)
    return model_args, gpam_args, data_args, training_args, resolve_checkpoint(training_args)


def check_supported(model_type: str, supported: tuple[str, ...], task: str) -> None:
    stock_type = model_type.removeprefix("gpam_")
    if stock_type not in supported:
        raise ValueError(
            f"{task}: architecture {stock_type!r} is not supported by this recipe (supported: {', '.join(supported)})"
        )


def resolve_checkpoint(training_args) -> str | None:
    """The checkpoint folder to resume from, with clear errors for a missing one.

    ``--resume_from_checkpoint True`` (or ``last``) picks the newest ``checkpoint-*`` in ``--output_dir``.
    """
    value = training_args.resume_from_checkpoint
    if value is None or value is False:
        return None
    if str(value).lower() in ("true", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint {value}: no checkpoint-* folder found in {training_args.output_dir!r}; "
                "pass the folder of a checkpoint, or train without --resume_from_checkpoint"
            )
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint: checkpoint folder {value!r} does not exist")
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise ValueError(
            f"--resume_from_checkpoint: {value!r} is not a Trainer checkpoint (no trainer_state.json); "
            "pass a checkpoint-* folder written by a training run"
        )
    return value


def _is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _saved_weight_shapes(checkpoint: str) -> tuple[str, dict[str, tuple]] | None:
    """``(description, {name: shape})`` of the weights in a checkpoint folder, read from the safetensors headers
    only (no tensor is loaded); None when the folder holds no safetensors weights.

    Looks for, in order: a LoRA adapter (``adapter_model.safetensors``), a sharded model
    (``model.safetensors.index.json`` and every shard its weight map names) and a single ``model.safetensors``.
    """
    from safetensors import safe_open

    def shapes_of(files: list[str]) -> dict[str, tuple]:
        shapes = {}
        for path in files:
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint {checkpoint!r} is incomplete: {os.path.basename(path)} is missing")
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes

    adapter = os.path.join(checkpoint, "adapter_model.safetensors")
    if os.path.isfile(adapter):
        return "LoRA adapter", shapes_of([adapter])
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return "sharded model", shapes_of([os.path.join(checkpoint, f) for f in sorted(set(weight_map.values()))])
    single = os.path.join(checkpoint, "model.safetensors")
    if os.path.isfile(single):
        return "model", shapes_of([single])
    return None


def check_checkpoint_matches(checkpoint: str, model) -> None:
    """Raise a ``ValueError`` when ``checkpoint`` holds weights of another model than ``model`` (other
    architecture, sizes, daGPAM layout, LoRA rank or targets) instead of letting the Trainer fail half-way with a
    shape error, or load a partial match.

    Full models are compared on every tensor the checkpoint holds (single or sharded safetensors); a
    ``peft.PeftModel`` is compared on the adapter state PEFT saves (``get_peft_model_state_dict``), both ways.
    """
    config_path = os.path.join(checkpoint, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("model_type") != model.config.model_type:
            raise ValueError(
                f"checkpoint {checkpoint!r} is a {saved.get('model_type')!r} model but this run builds a "
                f"{model.config.model_type!r} model; use the same --model_type / --model_name_or_path as the run that "
                "wrote it"
            )
    found = _saved_weight_shapes(checkpoint)
    if found is None:
        return
    kind, saved_shapes = found
    is_lora = _is_peft_model(model)
    if is_lora != (kind == "LoRA adapter"):
        advice = ("drop --use_lora to resume it" if is_lora
                  else "add --use_lora and the LoRA arguments of the run that wrote it")
        raise ValueError(
            f"checkpoint {checkpoint!r} holds a {kind} but this run trains "
            f"{'LoRA adapters' if is_lora else 'the full model'}; {advice}"
        )
    if is_lora:
        from peft import get_peft_model_state_dict

        expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}
    else:
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mismatched = [
        f"{name}: checkpoint {shape}, model {expected.get(name, 'missing')}"
        for name, shape in saved_shapes.items()
        if expected.get(name) != shape
    ]
    if is_lora:
        # PEFT saves exactly this state, so an adapter the checkpoint lacks is a different LoRA layout as well
        mismatched += [f"{name}: checkpoint missing, model {shape}" for name, shape in expected.items()
                       if name not in saved_shapes]
    if mismatched:
        shown = "; ".join(mismatched[:5]) + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 5 else "")
        raise ValueError(
            f"checkpoint {checkpoint!r} ({kind}) does not match the model of this run ({shown}). Resume with the "
            "same model, GPAM and LoRA arguments as the run that wrote it."
        )


def _holds_no_rows(path: str, extension: str) -> bool:
    """True when a data file is empty or blank: no non-blank line (txt, jsonl, json), no row under the CSV header,
    or an empty JSON array. Reads two non-blank lines at most, so a large file costs nothing."""
    head = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                head.append(line.strip())
                if len(head) == 2:
                    break
    if extension == "csv":
        return len(head) < 2
    if not head:
        return True
    text = "".join(head)
    return extension == "json" and text.startswith("[") and text[1:].lstrip().startswith("]")


def check_data_file(path: str | None, flag: str, extensions: tuple[str, ...]) -> str | None:
    """``path`` when it is an existing, non-empty data file with one of ``extensions``; a ``ValueError`` naming
    the file and the flag otherwise."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: data file {path!r} does not exist")
    extension = path.rsplit(".", 1)[-1].lower()
    if extension not in extensions:
        raise ValueError(f"{flag}: {path!r} has extension {extension!r}; supported: {', '.join(extensions)}")
    if _holds_no_rows(path, extension):
        what = "no data row under its CSV header" if extension == "csv" else "nothing but blank lines"
        raise ValueError(f"{flag}: data file {path!r} is empty ({what}); give a file with at least one example")
    return path


def saved_tokenizer_dir(output_dir: str, checkpoint: str | None) -> str | None:
    """A tokenizer written by an earlier (stopped) run of this recipe, so a resumed run uses the same one."""
    for candidate in (checkpoint, output_dir):
        if candidate and os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return candidate
    return None


def load_or_train_tokenizer(model_args, training_args, texts_for_training, checkpoint: str | None):
    """The checkpoint's tokenizer, ``--tokenizer_name``, or (from scratch) one trained on the training data.

    A trained tokenizer is trained by the main process and saved into ``--output_dir``; other DDP ranks load it.
    """
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is not None:
        # a GGUF file carries its tokenizer (and chat template)
        gguf = {"gguf_file": model_args.gguf_file} if model_args.tokenizer_name is None and model_args.gguf_file else {}
        return AutoTokenizer.from_pretrained(
            source, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code, **gguf,
        )
    is_main = training_args.process_index == 0
    # global main process first: the other ranks wait, then load what it saved into the shared output folder
    with training_args.main_process_first(local=False, desc="training the tokenizer"):
        if checkpoint is not None:
            existing = saved_tokenizer_dir(training_args.output_dir, checkpoint)
            if existing is not None:
                return AutoTokenizer.from_pretrained(existing)
        if not is_main:
            return AutoTokenizer.from_pretrained(training_args.output_dir)
        texts = texts_for_training()
        vocab_size = model_args.tokenizer_vocab_size
        kind = hf_gpam.ARCHITECTURES[model_args.model_type].scratch_tokenizer
        if kind == "sentencepiece_marian":
            return train_marian_sentencepiece(texts, vocab_size, save_directory=training_args.output_dir)
        # byte_level_bpe_gpt2 (every causal LM) or byte_level_bpe_bart
        style = kind.removeprefix("byte_level_bpe_")
        return train_byte_level_bpe(texts, vocab_size, model_type=style, save_directory=training_args.output_dir)


def parse_config_overrides(config_class: type, overrides: str | None) -> dict:
    """``--config_overrides`` ("n_layer=2,n_embd=64") as constructor keyword arguments of ``config_class``.

    The names and value types are checked by ``update_from_string`` on a default config (unknown fields and bad
    values raise ``ValueError``). The values then go to the constructor rather than being set on a built config:
    fields computed in ``__init__`` from others (Llama's ``head_dim = hidden_size // num_attention_heads``, Gemma3's
    ``layer_types`` from ``num_hidden_layers``) would otherwise keep the defaults' values.
    """
    if not overrides:
        return {}
    probe = config_class()
    try:
        probe.update_from_string(overrides)
    except ValueError as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from error
    names = [item.split("=", 1)[0].strip() for item in overrides.split(",") if item.strip()]
    return {name: getattr(probe, name) for name in names}


def scratch_config(model_args, gpam_args, tokenizer):
    """A GPAM config of ``--model_type`` with the stock defaults, ``--config_overrides`` and the tokenizer's
    vocabulary and special tokens (which config field takes which token: the row's ``scratch_token_ids``)."""
    architecture = hf_gpam.ARCHITECTURES[model_args.model_type]
    config_class = architecture.config_class
    overrides = parse_config_overrides(config_class, model_args.config_overrides)
    token_ids = {name: getattr(tokenizer, attribute) for name, attribute in architecture.scratch_token_ids.items()}
    config = config_class(**{**gpam_args.options(), **overrides, "vocab_size": len(tokenizer), **token_ids})
    if hasattr(config, "decoder_vocab_size"):
        # Marian sizes its output layer by decoder_vocab_size
        config.decoder_vocab_size = len(tokenizer)
    config.check_gpam_fields()
    return config


QUANTIZATION_METHODS = ("bnb-4bit", "bnb-8bit", "torchao-int8")


def quantization_config(model_args):
    """The transformers quantization config of ``--quantization`` (None without it)."""
    method = model_args.quantization
    if method is None:
        return None
    if method.startswith("bnb"):
        from transformers import BitsAndBytesConfig

        if method == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, model_args.bnb_4bit_compute_dtype),
        )
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def quantized_device_map() -> dict:
    # the whole quantized model on this process's device: GPU i under a multi-GPU launch, else the first GPU or the CPU
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def evaluation_before_training_is_safe(model_args, training_args) -> bool:
    """False (with a warning) where an evaluation before training breaks the training after it.

    Measured here (bitsandbytes 0.50, peft 0.21, transformers 5.24, CPU): after a Trainer evaluation of a 4-bit base,
    every LoRA adapter gets zero gradients for the rest of the run and nothing trains, with stock attention too
    (gpam_mode='softmax'); 8-bit and torchao bases train normally. The recipe then skips that evaluation on the CPU.
    """
    if model_args.quantization == "bnb-4bit" and training_args.do_train and not torch.cuda.is_available():
        logger.warning(
            "--quantization bnb-4bit on the CPU: skipping the evaluation before training (after one, bitsandbytes' "
            "4-bit CPU layers pass no gradients to the LoRA adapters and the run would train nothing); the "
            "evaluation after training runs as usual"
        )
        return False
    return True


def load_model(model_args, gpam_args, auto_class, tokenizer, supported: tuple[str, ...], task: str):
    """Build the model from one of the three sources and return ``(model, base_model_name)``."""
    common = dict(attn_implementation=model_args.attn_implementation)
    if model_args.quantization is not None:
        common.update(quantization_config=quantization_config(model_args), device_map=quantized_device_map())
    if model_args.model_name_or_path is None:
        config = scratch_config(model_args, gpam_args, tokenizer)
        check_supported(config.model_type, supported, task)
        return auto_class.from_config(config, **common), None

    hub = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir)
    if model_args.gguf_file is not None:
        hub["gguf_file"] = model_args.gguf_file
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **hub
    )
    check_supported(config.model_type, supported, task)
    model = auto_class.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **hub, **common
    )
    if hf_gpam.is_gpam_model(model):
        ignored = gpam_args.explicitly_set()
        if ignored:
            logger.warning(
                "%s is already a GPAM checkpoint: its own gpam_* settings are kept and %s are ignored",
                model_args.model_name_or_path, ", ".join(ignored),
            )
        return model, model_args.model_name_or_path
    return hf_gpam.patch_model(model, **gpam_args.options()), model_args.model_name_or_path


def check_gguf_source(model_name_or_path: str, gguf_file: str) -> None:
    """One clear line for a GGUF file that is missing or of an architecture transformers' GGUF loader cannot read."""
    from hf_gpam.modeling.gpam_gguf import check_gguf_architecture, check_gguf_file

    check_gguf_file(model_name_or_path, gguf_file)
    local = gguf_file if os.path.isfile(gguf_file) else os.path.join(model_name_or_path, gguf_file)
    if os.path.isfile(local):
        check_gguf_architecture(local)


def apply_lora(model, model_args, task_type: str):
    """Wrap ``model`` with LoRA adapters on the architecture's default targets (or ``--lora_target_modules``),
    including daGPAM's ``gpam_q_neg``, and train every ``gpam_lambda`` in full through ``modules_to_save``."""
    from peft import LoraConfig, get_peft_model

    module_names = [name for name, _ in model.named_modules() if name]

    def found(target: str) -> bool:
        # PEFT's rule for a list of targets: the full module name, or its suffix after a dot
        return any(name == target or name.endswith("." + target) for name in module_names)

    if model_args.lora_target_modules:
        missing = [t for t in model_args.lora_target_modules if not found(t)]
        if missing:
            candidates = sorted(
                {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
            )
            raise ValueError(
                f"--lora_target_modules: {', '.join(map(repr, missing))} "
                f"{'matches' if len(missing) == 1 else 'match'} no module of this {model.config.model_type} model; "
                f"candidates (its Linear / Conv1D layers): {', '.join(candidates)}"
            )
        targets = list(model_args.lora_target_modules)
    else:
        defaults = default_lora_targets(model.config.model_type)
        targets = [t for t in defaults if found(t)]
        # e.g. gpam_q_neg on a softmax-mode model; the user did not ask for these, so they are only reported
        skipped = [t for t in defaults if t not in targets]
        if skipped:
            logger.info("LoRA: default targets %s are not modules of this model; skipped", skipped)
    # a trainable λ is a parameter (a fixed one is a buffer); not requires_grad, which
    # prepare_model_for_kbit_training turns off everywhere
    has_trainable_lambda = any(
        isinstance(getattr(module, "gpam_lambda", None), nn.Module)
        and any(True for _ in module.gpam_lambda.parameters())
        for module in model.modules()
    )
    # GPT-2's c_attn / c_proj / c_fc are Conv1D (weight stored transposed); PEFT resets it for nn.Linear targets
    fan_in_fan_out = any(
        isinstance(module, Conv1D)
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    )
    lora_config = LoraConfig(
        task_type=task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=LORA_MODULES_TO_SAVE if has_trainable_lambda else None,
        fan_in_fan_out=fan_in_fan_out,
    )
    model = get_peft_model(model, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA on %s (+ modules_to_save %s): %d of %d parameters trainable", targets,
                lora_config.modules_to_save, trainable, total)
    return model


def stored_parameter(parameter) -> tuple[int, int]:
    """``(logical element count, bytes stored)`` of a parameter, quantized ones included.

    bitsandbytes' 4-bit weights pack two values per byte (``quant_state.shape`` is the logical shape) and carry
    per-block scales; torchao's int8 weights are a tensor subclass whose ``dtype`` reads float32 while it stores int8
    values (``qdata``) and scales.
    """
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        count = math.prod(quant_state.shape)
        scales = getattr(quant_state, "absmax", None)
        extra = scales.numel() * scales.element_size() if isinstance(scales, torch.Tensor) else 0
        return count, parameter.numel() * parameter.element_size() + extra
    qdata = getattr(parameter, "qdata", None)
    if isinstance(qdata, torch.Tensor):
        scale = getattr(parameter, "scale", None)
        extra = scale.numel() * scale.element_size() if isinstance(scale, torch.Tensor) else 0
        return parameter.numel(), qdata.numel() * qdata.element_size() + extra
    return parameter.numel(), parameter.numel() * parameter.element_size()


def training_footprint(model) -> dict:
    """Parameter counts and a lower bound on training memory: weights as stored (quantized bases at their packed
    size), plus gradients and AdamW's two moment buffers of the trainable ones (LoRA adapters, W⁻, λ: each the size
    of its parameter), in GiB. Activations, which grow with batch size and sequence length, come on top. Works on a
    model built on the ``meta`` device."""
    total = trainable = 0
    weights = states = 0
    for p in model.parameters():
        count, size = stored_parameter(p)
        total += count
        weights += size
        if p.requires_grad:
            trainable += count
            # gradient + exp_avg + exp_avg_sq
            states += 3 * size
    return {"parameters": total, "trainable_parameters": trainable, "weights_gib": weights / 2**30,
            "gib": (weights + states) / 2**30}


def log_training_footprint(model) -> dict:
    """Log ``training_footprint`` before training starts, so that a model far larger than intended (e.g.
    ``--model_type marian`` without ``--config_overrides``: the ~400M-parameter default Marian) shows up before
    the first slow step."""
    footprint = training_footprint(model)
    method = hf_gpam.modeling.gpam_modeling_utils.quantization_method(getattr(model, "config", None))
    quantized = f" (base quantized with {method})" if method else ""
    logger.info(
        "model: %s parameters (%s trainable); weights %.2f GiB%s, + gradients + AdamW state ≈ %.2f GiB, "
        "activations not included", f"{footprint['parameters']:,}", f"{footprint['trainable_parameters']:,}",
        footprint["weights_gib"], quantized, footprint["gib"],
    )
    return footprint


def prepare_model(model_args, gpam_args, auto_class, tokenizer, checkpoint: str | None, *,
                  supported: tuple[str, ...], task: str, lora_task_type: str):
    """The model a recipe trains: loaded or built (``load_model``), wrapped with LoRA under ``--use_lora``,
    checked against the checkpoint it resumes from, and its size and memory logged.

    Returns:
        ``(model, base_model_name)``; ``base_model_name`` is None from scratch.
    """
    model, base_model = load_model(model_args, gpam_args, auto_class, tokenizer, supported=supported, task=task)
    if model_args.quantization is not None and model_args.quantization.startswith("bnb"):
        from peft import prepare_model_for_kbit_training

        # what PEFT expects of a bitsandbytes base: layer norms and the (unquantized) daGPAM weights in float32,
        # input gradients on for checkpointing; gradient checkpointing itself stays the Trainer's --gradient_checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if model_args.use_lora:
        model = apply_lora(model, model_args, task_type=lora_task_type)
    if checkpoint is not None:
        check_checkpoint_matches(checkpoint, model)
    log_training_footprint(model)
    return model, base_model


class GpamDecayMixin:
    """Trainer mixin: weight decay follows ``hf_gpam.training.gpam_decay_parameter_names`` (λ never decays, W⁻
    only with ``gpam_weight_decay=True``) instead of decaying them like any weight matrix."""

    def __init__(self, *args, gpam_weight_decay: bool = False, **kwargs):
        self.gpam_weight_decay = gpam_weight_decay
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        return gpam_decay_parameter_names(model, gpam_weight_decay=self.gpam_weight_decay)


class GpamTrainer(GpamDecayMixin, Trainer):
    """``Trainer`` with daGPAM's weight-decay rule (``--gpam_weight_decay``)."""


class GpamSeq2SeqTrainer(GpamDecayMixin, Seq2SeqTrainer):
    """``Seq2SeqTrainer`` with daGPAM's weight-decay rule (``--gpam_weight_decay``)."""


def recipe_command(script: str, argv) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", script, *map(shlex.quote, argv)])


def write_outputs(trainer, model, tokenizer, model_args, results: dict, card: dict) -> None:
    """Save the finished run as a Hub-ready folder in ``--output_dir`` (main process only).

    - full fine-tuning: weights, config with auto_map, modeling code, tokenizer, all_results.json, README.md;
    - ``--use_lora``: the adapter, tokenizer, results and card; with ``--merge_lora`` the merged full model is the
      folder's model and the adapter goes to ``adapter/``.
    """
    output_dir = trainer.args.output_dir
    if getattr(trainer, "is_fsdp_enabled", False):
        # FSDP shards the weights across ranks (FSDP2 DTensors, FSDP1 flat parameters), so every rank takes part in
        # gathering the full state dict (onto rank 0's CPU; the call accelerate's get_state_dict makes for FSDP2,
        # and it works whatever fsdp_state_dict_type the run was configured with). Rank 0 loads it into an
        # unsharded copy of the model, full or PEFT-wrapped, and the folder is written from that copy below: the
        # sharded model itself must not be touched by one rank alone. Run on a really sharded model (FSDP2 over
        # gloo, 2 CPU ranks) by tests/test_distributed.py.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not trainer.is_world_process_zero():
            return
        base = model.get_base_model() if model_args.use_lora else model
        auto_class = AutoModelForSeq2SeqLM if base.config.is_encoder_decoder else AutoModelForCausalLM
        unsharded = auto_class.from_config(base.config, dtype=base.dtype)
        if model_args.use_lora:
            from peft import get_peft_model

            unsharded = get_peft_model(unsharded, model.peft_config[model.active_adapter])
        # strict: every gathered tensor has its place in the copy and every parameter of the copy is filled
        unsharded.load_state_dict(full_state)
        model = unsharded
    if not trainer.is_world_process_zero():
        return
    results = {**results, "gpam_lambdas": gpam_lambda_values(model)}
    # The recipes never resize the vocabulary, so the adapter holds no embedding rows. PEFT's default "auto" would look
    # for the base's config.json to check that, and a GGUF base folder has none (it warns), a Hub id costs a request.
    adapter_kwargs = {"save_embedding_layers": False} if model_args.use_lora else {}
    if model_args.use_lora and not model_args.merge_lora:
        model.save_pretrained(output_dir, **adapter_kwargs)
        tokenizer.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "all_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=4, sort_keys=True)
        adapter_note = (
            "This folder holds a LoRA adapter: convert the base checkpoint with hf_gpam.patch_model and the GPAM "
            "settings listed in this card, then attach the adapter with peft.PeftModel.from_pretrained."
        )
        card = {**card, "limitations": " ".join(filter(None, [card.get("limitations"), adapter_note]))}
        text = render_model_card(model.get_base_model(), results=results, **card)
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(text)
        return
    if model_args.use_lora:
        model.save_pretrained(os.path.join(output_dir, "adapter"), **adapter_kwargs)
        model = model.merge_and_unload()
    save_hub_ready(model, output_dir, tokenizer=tokenizer, results=results, **card)


def push_folder(trainer, commit_message: str) -> None:
    """Upload the finished folder (not the intermediate checkpoints) to the run's Hub repository."""
    if not (trainer.args.push_to_hub and trainer.is_world_process_zero()):
        return
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
        folder_path=trainer.args.output_dir,
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**"],
        token=trainer.args.hub_token,
    )


def check_chat_template(tokenizer, prompt: str | None) -> None:
    """``--chat_prompt`` needs a tokenizer with a chat template (an instruct model's); say so before training."""
    if prompt is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "--chat_prompt needs a tokenizer with a chat template (an instruct model's, e.g. SmolLM2-135M-Instruct); "
            "this run's tokenizer has none: drop --chat_prompt"
        )


@torch.no_grad()
def chat_answer(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """The model's greedy answer to one user turn, formatted with the tokenizer's chat template."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    training = model.training
    model.eval()
    try:
        # the Trainer sets config.use_cache=False for training; generation wants the cache
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        model.train(training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def lambda_per_layer_lines(lambdas: dict[str, list], per_line: int = 4) -> list[str]:
    """``gpam_lambda_values`` as a few text lines: each daGPAM module's λ, mean over heads with the head range."""
    cells = []
    for name, values in lambdas.items():
        flat = torch.tensor(values, dtype=torch.float64).flatten()
        # the module name without the model's prefix, e.g. "layers.3.self_attn"
        short = ".".join(part for part in name.split(".") if part not in ("base_model", "model", "transformer"))
        cells.append(f"{short} {flat.mean():+.4f} [{flat.min():+.3f}, {flat.max():+.3f}]")
    return ["  " + "   ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line)]


def print_closing_summary(title: str, rows: list[tuple[str, str]], lambdas: dict[str, list], output_dir: str | None,
                          next_commands: list[str]) -> None:
    """Print what a run did, on the main process: ``rows`` of (what, before -> after), λ per layer, the output
    folder and the commands to try next. Printed (not logged), so it shows whatever the log level."""
    width = max([len(label) for label, _ in rows] + [10])
    lines = ["", f"=== {title} ==="]
    lines += [f"{label.ljust(width)}  {value}" for label, value in rows]
    if lambdas:
        lines.append("λ per daGPAM module after training (mean over heads [min, max]):")
        lines += lambda_per_layer_lines(lambdas)
    else:
        lines.append("λ: none (softmax attention: --gpam_mode softmax, or no daGPAM layer)")
    if output_dir is not None:
        lines.append(f"{'output'.ljust(width)}  {os.path.abspath(output_dir)}")
    if next_commands:
        lines.append("next:")
        lines += [f"  {command}" for command in next_commands]
    print("\n".join(lines), flush=True)


def before_after(results: dict, before_key: str, after_key: str, fmt: str = "{:.4f}") -> str:
    """``"before -> after"`` of two result keys, "n/a" for one that is missing."""
    def shown(key):
        return fmt.format(results[key]) if key in results else "n/a"
    return f"{shown(before_key)} -> {shown(after_key)}"
