"""transformers -> llama.cpp: architecture metadata, tensor names and tensor layouts, as llama.cpp's own
convert_hf_to_gguf.py writes them (Llama, Qwen2 and GPT-2 families). Names come from gguf-py's TensorNameMap;
only what the converter changes by hand is written here:

  Llama  q_proj/k_proj rows permuted per head, (n_head, 2, d/2) -> (n_head, d/2, 2): llama.cpp's rotary embedding
         pairs neighbouring dimensions, transformers' pairs the two halves of each head (k: n_head = n_head_kv)
  GPT-2  Conv1D weights stored (in, out) are transposed to (out, in); the causal-mask buffers are dropped
  all    a tied lm_head is not written (llama.cpp uses token_embd.weight as the output then); "tied" is what the
         model holds, not what its config said: a merged modules_to_save head or embedding unties them
"""

from __future__ import annotations

import gguf
import torch

from loraforge.lora.adapters import AdapterError

# transformers architecture -> llama.cpp architecture (gguf.MODEL_ARCH)
ARCHS = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "GPT2LMHeadModel": gguf.MODEL_ARCH.GPT2,
}
GPT2_TRANSPOSED = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class ExportError(AdapterError):
    """A model or adapter that the asked format cannot express; the message says why and what to do instead."""


def arch_of(config) -> gguf.MODEL_ARCH:
    name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if name not in ARCHS:
        raise ExportError(f"GGUF export supports the {', '.join(ARCHS)} architectures; this base is {name} "
                          f"(use `loraforge merge` and llama.cpp's convert_hf_to_gguf.py on the merged directory)")
    return ARCHS[name]


def check_exportable(config) -> gguf.MODEL_ARCH:
    """arch_of(config), and ExportError for what add_hparams cannot write (a rope scaling): read from the config
    alone, so a base is refused before it loads and merges (a Llama 3.1 base's rope scaling was refused after its
    weights had loaded in fp32 and the adapter had merged)."""
    arch = arch_of(config)
    if arch != gguf.MODEL_ARCH.GPT2:
        _rope_theta(config)
    return arch


def arch_name(arch: gguf.MODEL_ARCH) -> str:
    return gguf.MODEL_ARCH_NAMES[arch]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if kind != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in
                             (None, "default")):
        raise ExportError(f"rope scaling {kind!r} is not exported yet; use `loraforge merge` and llama.cpp's "
                          f"convert_hf_to_gguf.py on the merged directory")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def add_hparams(writer: gguf.GGUFWriter, config, arch: gguf.MODEL_ARCH) -> None:
    """The `{arch}.*` keys llama.cpp's converter writes for this architecture."""
    if arch == gguf.MODEL_ARCH.GPT2:
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)


def gguf_name(hf_name: str, config, arch: gguf.MODEL_ARCH, tied: bool) -> str | None:
    """llama.cpp's name for a state-dict key, or None for what its converter leaves out. `tied`: the model's
    lm_head is its input embedding (then only token_embd.weight is written)."""
    if hf_name.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's causal-mask buffers
        return None
    if hf_name == "lm_head.weight" and tied:
        return None
    n_layer = config.n_layer if arch == gguf.MODEL_ARCH.GPT2 else config.num_hidden_layers
    name = gguf.get_tensor_name_map(arch, n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"no llama.cpp tensor name for {hf_name!r} ({arch_name(arch)} architecture)")
    return name


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from transformers' half-split rotary order to llama.cpp's interleaved order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def row_permutation(hf_name: str, config, arch: gguf.MODEL_ARCH):
    """The head count to permute the output rows of `hf_name` with (Llama q/k), or None."""
    if arch != gguf.MODEL_ARCH.LLAMA:
        return None
    if ".q_proj." in hf_name + ".":
        return config.num_attention_heads
    if ".k_proj." in hf_name + ".":
        return config.num_key_value_heads
    return None


def to_gguf_layout(hf_name: str, tensor: torch.Tensor, config, arch: gguf.MODEL_ARCH) -> torch.Tensor:
    """A full weight or bias in llama.cpp's layout: rows (out) first, Llama q/k permuted."""
    if arch == gguf.MODEL_ARCH.GPT2 and hf_name.endswith(GPT2_TRANSPOSED):
        tensor = tensor.T
    n_head = row_permutation(hf_name, config, arch)
    return _permute(tensor, n_head) if n_head else tensor


def lora_b_layout(module_path: str, lora_B: torch.Tensor, config, arch: gguf.MODEL_ARCH) -> torch.Tensor:
    """lora_B (out, r) with its rows in llama.cpp's order: ΔW = B·A permutes as B's rows do."""
    n_head = row_permutation(module_path + ".weight", config, arch)
    return _permute(lora_B, n_head) if n_head else lora_B
