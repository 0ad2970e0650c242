"""The GPAM model code. This folder is what ``save_pretrained`` copies next to a checkpoint, so its modules import
only torch, transformers, the standard library and each other (``from .x import y``), never ``hf_gpam``."""

from .configuration_gpam_bart import GpamBartConfig
from .configuration_gpam_gpt2 import GpamGPT2Config
from .configuration_gpam_marian import GpamMarianConfig
from .gpam_attention import GpamAttentionMixin, GpamLambda
from .modeling_gpam_bart import GpamBartAttention, GpamBartForConditionalGeneration, GpamBartModel
from .modeling_gpam_gpt2 import GpamGPT2Attention, GpamGPT2LMHeadModel, GpamGPT2Model
from .modeling_gpam_marian import GpamMarianAttention, GpamMarianModel, GpamMarianMTModel
# the decoder-only families (Llama, Mistral, Qwen2/3, Gemma2/3, Phi-3, GPT-NeoX, OPT, OLMo2), generated from a table
from .configuration_gpam_decoders import *  # noqa: E402, F403
from .modeling_gpam_decoders import *  # noqa: E402, F403
