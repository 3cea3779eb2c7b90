"""Memory estimator: how much memory a full fine-tune, LoRA, QLoRA, DoRA or AdaLoRA run needs, broken down.

`estimate("7b", "qlora", batch_size=1, seq_len=512)` → {"weights": bytes, "adapter": ..., "gradients": ...,
"optimizer_states": ..., "activations": ..., "total": ...}. Shapes: well-known Llama sizes ("7b", "13b",
"70b", and LLaMA-1 "65b"), a local transformers directory or the built-in model (its config.json): a Llama-style
decoder (llama, mistral, qwen2, qwen3, gemma 1-3, or any config with their fields and their block; head_dim where
the config sets it), Phi-3 (the same block with fused qkv_proj and gate_up_proj), GPT-2 (Conv1D layers, learned
positions, biases everywhere) or a mixture of experts it knows (mixtral, qwen2_moe with its shared expert,
qwen3_moe). Another config, or another mixture of experts, is refused in one short line naming its model_type; so is
a config with Llama's fields whose model holds other layers (GPT-NeoX, OLMo 2, Cohere, StableLM: the
model transformers builds from the config, on the meta device, is counted against the reading). Parameter counts are
exact for these (biases included: Qwen2's q/k/v, Llama's attention_bias).

What each part counts, per the training loop in train.py (trainable weights kept in fp32):
  weights           frozen base in `dtype` (bf16: 2 bytes); QLoRA: linear layers at 4.127 bits (NF4 + double
                    quantization, see quant.py); prepare_for_kbit_training puts embeddings, lm_head and norms
                    in fp32 (as PEFT does), so QLoRA activations are fp32 too. The experts and routers of a
                    mixture of experts are 3-D tensors (transformers 5), not linear layers: QLoRA leaves them
                    unquantized, so in fp32 too. Full fine-tune: the trained weights themselves, fp32.
  adapter           LoRA A and B, fp32: r·(in + out) values per targeted linear layer ("all-linear" on a mixture
                    of experts: the attention projections only); DoRA adds its magnitude (out values), AdaLoRA
                    its singular values (r values; r is its init_r: pruning zeroes them, the tensors stay).
  gradients         one fp32 value per trainable parameter.
  optimizer_states  AdamW: two fp32 moments (8 bytes per trainable parameter); 8-bit AdamW: two uint8
                    moments + an fp32 absmax per 256 values (bnb's blockwise 8-bit state). AdaLoRA adds its
                    rank allocator's two fp32 averages per adapter value (8 bytes).
  activations       what autograd saves for the backward pass, and one layer's working room in backward; see
                    `activation_bytes` for the formula.
Framework overhead (CUDA context, allocator slack, Python) is not included: on CPU, glibc's heap keeps freed
blocks resident, so the resident peak runs above the live tensors (docs/PERFORMANCE.md, "Memory on CPU").
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from loraforge.argtypes import NonEmpty, PositiveInt
from loraforge.config import MAX_RANK, ConfigError, LoraConfig, digits_shown
from loraforge.lora.inject import find_targets
from loraforge.models import BUILTIN_MODELS, check_fits_context, load_config, model_skeleton, resolve_model
from loraforge.training.loss import HEAD_CHUNK
from loraforge.utils.files import expand_user, missing_note
from loraforge.utils.table import text_table

GB = 1e9
MAX_TOKENS = 10**12  # --batch-size × --seq-len: past any device's memory, and far within a float's range
MAX_GPUS = 10**9
QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # NF4 with double quantization (quant.bits_per_weight_formula)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that decide its memory."""

    hidden_size: int
    intermediate_size: int
    """The MLP's width; with experts, each expert's (mixtral's intermediate_size, qwen3_moe's moe_intermediate_size)."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    """Width of one attention head (None: hidden_size // num_attention_heads); Qwen3 and Gemma set it apart."""
    num_experts: int = 0
    """Experts per layer, each a gate/up/down MLP, plus a router (hidden → experts); 0: one dense MLP."""
    experts_per_token: int = 0
    """Experts each token is routed to (num_experts_per_tok); decides the MLP's activations."""
    qk_norm: bool = False
    """An RMSNorm of head_dim on the queries and one on the keys in every layer (Qwen3, Gemma 3)."""
    layer_norms: int = 2
    """Norms in each decoder layer: 2 (before attention and before the MLP), 4 where Gemma 2 and 3 also norm each
    sublayer's output."""
    biased: tuple[str, ...] = ()
    """The linear layers of linear_shapes that hold a bias (out values): Qwen2's q/k/v, all of GPT-2's."""
    shared_expert_size: int = 0
    """Qwen2-MoE: the width of the shared expert, a gate/up/down MLP of linear layers beside the experts, scaled by
    a linear gate (hidden → 1); 0: none."""
    gpt2: bool = False
    """GPT-2's block: fused c_attn (hidden → 3·hidden), c_proj, a GELU MLP c_fc/c_proj (no gate), LayerNorms with a
    bias, learned position embeddings (positions × hidden)."""
    positions: int = 0
    """Learned position embeddings (GPT-2's n_positions); 0: rotary, no parameters."""
    fused: bool = False
    """Phi-3's block: q, k and v in one linear (qkv_proj: hidden → q + 2·kv), gate and up in one (gate_up_proj:
    hidden → 2·intermediate); the same weights as Llama's, fewer LoRA factors."""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.head_size * self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.num_key_value_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer (experts are not linear layers: expert_params)."""
        h, i, q, kv, s = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim, self.shared_expert_size
        if self.gpt2:
            return {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, i), "mlp.c_proj": (i, h)}
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        attention = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.num_experts:
            shared = {"shared_expert.gate_proj": (h, s), "shared_expert.up_proj": (h, s),
                      "shared_expert.down_proj": (s, h), "shared_expert_gate": (h, 1)} if s else {}
            return {**attention, **shared}
        return {**attention, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear layers, their biases included: what QLoRA quantizes."""
        shapes = self.linear_shapes()
        bias = sum(shapes[name][1] for name in self.biased)
        return self.num_hidden_layers * (sum(a * b for a, b in shapes.values()) + bias)

    @property
    def expert_params(self) -> int:
        """Every layer's experts (gate, up and down projections) and router: 3-D tensors, neither adapted by
        "all-linear" nor quantized."""
        h, i = self.hidden_size, self.intermediate_size
        return self.num_hidden_layers * self.num_experts * (3 * h * i + h)

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output head (once when tied), and learned positions (GPT-2)."""
        return (self.vocab_size * (1 if self.tie_word_embeddings else 2) + self.positions) * self.hidden_size

    @property
    def norm_params(self) -> int:
        """The layers' norms and a final one (weight; LayerNorm's bias too), and Qwen3's q/k norms."""
        qk = 2 * self.head_size if self.qk_norm else 0
        per_norm = 2 * self.hidden_size if self.gpt2 else self.hidden_size
        return (self.layer_norms * self.num_hidden_layers + 1) * per_norm + self.num_hidden_layers * qk

    @property
    def total_params(self) -> int:
        return self.linear_params + self.expert_params + self.embedding_params + self.norm_params


# Llama shapes from the papers' tables / the released config.json files.
KNOWN_SHAPES = {
    "7b": ModelShape(4096, 11008, 32, 32, 32, 32000),  # Llama 2 7B
    "13b": ModelShape(5120, 13824, 40, 40, 40, 32000),  # Llama 2 13B
    "65b": ModelShape(8192, 22016, 80, 64, 64, 32000),  # LLaMA-1 65B (the QLoRA paper's 48 GB example)
    "70b": ModelShape(8192, 28672, 80, 64, 8, 32000),  # Llama 2 70B (grouped-query attention, 8 KV heads)
}
# Their context, as their released config.json files say it (max_position_embeddings): --seq-len is checked against
# it as a directory's or the built-in model's is against theirs (models.check_fits_context).
KNOWN_CONFIGS = {
    "7b": SimpleNamespace(max_position_embeddings=4096, name_or_path="Llama 2 7B"),
    "13b": SimpleNamespace(max_position_embeddings=4096, name_or_path="Llama 2 13B"),
    "65b": SimpleNamespace(max_position_embeddings=2048, name_or_path="LLaMA-1 65B"),
    "70b": SimpleNamespace(max_position_embeddings=4096, name_or_path="Llama 2 70B"),
}

METHODS = ("full", "lora", "qlora", "dora", "adalora")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "paged_adamw": 8.0,
                         "adamw_8bit": 2 + 2 * 4 / 256, "paged_adamw_8bit": 2 + 2 * 4 / 256}


# The mixtures of experts the estimate knows: model_type -> the config field of each expert's MLP width. The number
# of experts is num_local_experts (as transformers 5 saves it) or num_experts (Qwen's hub configs).
MOE_WIDTH = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
             "qwen3_moe": "moe_intermediate_size"}
QK_NORM = ("qwen3", "qwen3_moe", "gemma3_text")  # model types with an RMSNorm on q and on k
SANDWICH_NORMS = ("gemma2", "gemma3_text")  # model types with 4 norms a layer (each sublayer's input and output)
QKV_BIAS = ("qwen2", "qwen2_moe")  # q/k/v with a bias (qwen2_moe: unless its qkv_bias says false)
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
GPT2_FIELDS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "vocab_size": "vocab_size", "n_positions": "n_positions"}
"""GPT-2's config.json names (its n_inner, null by default, is the MLP's width: 4 × n_embd when null)."""


def model_shape(model: str | ModelShape) -> ModelShape:
    """A known size name ("7b", ...), a transformers directory, or the built-in model name."""
    if isinstance(model, ModelShape):
        return model
    if model.lower() in KNOWN_SHAPES:
        return KNOWN_SHAPES[model.lower()]

    path = expand_user(model)
    if not path.is_dir() and model not in BUILTIN_MODELS:
        raise ValueError(f"model {model!r} is neither a known size ({', '.join(KNOWN_SHAPES)}), "
                         f"a transformers directory, nor a built-in model ({', '.join(BUILTIN_MODELS)})")
    file = Path(resolve_model(model, weights=False)) / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"{file} is not valid JSON ({e})"]) from None
    check_config_values(cfg, file)
    cfg = {**class_defaults(model), **cfg}
    shape = config_shape(cfg)
    check_against_model(shape, model, cfg.get("model_type"))
    return shape


READS = ("llama, mistral, qwen2, qwen3, gemma (1-3), phi3, gpt2 and the mixtures of experts mixtral, qwen2_moe, "
         "qwen3_moe")
"""What the estimate reads, as its refusals name it."""


def _in_out(module) -> tuple[int, int]:
    """(in, out) of a linear layer: GPT-2's Conv1D stores its weight (in, out), nn.Linear (out, in)."""
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def check_against_model(shape: ModelShape, model: str, kind) -> None:
    """ConfigError (one line naming the model_type) where the model transformers builds from the config, on the
    meta device (no weights read or held), has other parameters or other linear layers than `shape` reads: a config
    with Llama's fields is not always Llama's block (GPT-NeoX's biased LayerNorms and ungated MLP, OLMo 2's extra
    norms, Phi-3's fused layers were counted as Llama's, silently). A model_type transformers cannot build is not
    checked (config.json alone is read)."""
    try:
        skeleton = model_skeleton(model)
    except Exception:  # noqa: BLE001 -- an unknown model_type, a config its class refuses: read as it says
        return
    total = sum(p.numel() for p in skeleton.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-linear on a mixture of experts: its experts get no adapter (said)
        paths = find_targets(skeleton, LoraConfig(target_modules="all-linear"))
    linear = sorted(_in_out(skeleton.get_submodule(p)) for p in paths)
    read = sorted(shape.linear_shapes().values()) * shape.num_hidden_layers
    if total == shape.total_params and linear == sorted(read):
        return
    sizes = "a Llama-style decoder of its config.json's sizes"
    differs = (f"holds {total:,} parameters where {sizes} holds {shape.total_params:,}" if total != shape.total_params
               else f"has other linear layers (so other LoRA factors) than {sizes}")
    raise ConfigError([f"model_type {kind!r}: its model {differs}; the estimate reads {READS}"])


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
              float: "a number", type(None): "null"}
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", *dict.fromkeys(MOE_WIDTH.values()),
                  "shared_expert_intermediate_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner")
"""Sizes a config.json may leave out or set to null (the class's default, or hidden_size // heads, applies)."""
EXPERT_COUNTS = ("num_local_experts", "num_experts", "num_experts_per_tok")


def check_config_values(cfg, file: Path) -> None:
    """ConfigError (one line naming the field and `file`) for a config.json whose sizes are no positive whole
    numbers: 0 heads divided by zero, a null vocab_size or a "64" string failed deep in the arithmetic (or in
    transformers' own config class) as tracebacks. Fields that are absent are left to config_shape."""
    if not isinstance(cfg, dict):
        raise ConfigError([f"{file} holds {JSON_TYPES.get(type(cfg), type(cfg).__name__)}, not an object of config "
                           f"fields: not a transformers config"])
    for field in (*LLAMA_FIELDS, *OPTIONAL_SIZES, *EXPERT_COUNTS):
        value = cfg.get(field)
        if field not in cfg or (value is None and field not in LLAMA_FIELDS):
            continue
        least = 0 if field in EXPERT_COUNTS else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            what = (f"{value}" if isinstance(value, int) and not isinstance(value, bool) else "null" if value is None
                    else f"{JSON_TYPES.get(type(value), type(value).__name__)} ({json.dumps(value)})")
            need = "a positive whole number" if least else "a whole number (0 or more)"
            raise ConfigError([f"{field} in {file} is {what}; it must be {need}: fix the config.json"])
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise ConfigError([f"tie_word_embeddings in {file} is {JSON_TYPES.get(type(tie), type(tie).__name__)} "
                           f"({json.dumps(tie)}); it must be true or false: fix the config.json"])


def class_defaults(model: str) -> dict:
    """Every field of the model's transformers config class, the defaults of those config.json leaves out
    included: Gemma ties its output head to the embedding unless told otherwise (tie_word_embeddings, True in
    GemmaConfig, False in LlamaConfig) and its head_dim is 256, not hidden_size // heads. Empty where transformers
    does not know the model_type (config_shape then reads config.json alone)."""
    try:
        return load_config(model).to_dict()
    except Exception:  # noqa: BLE001 -- an unknown model_type (ValueError), a field transformers validates, ...
        return {}


def config_shape(cfg: dict) -> ModelShape:
    """The shape of a transformers config.json; ConfigError (one line) for an architecture the estimate can't read."""
    kind = cfg.get("model_type")
    if kind == "gpt2":
        return gpt2_shape(cfg)
    experts = {k: v for k, v in cfg.items() if "expert" in k and type(v) is int and v > 0}
    if experts and kind not in MOE_WIDTH:
        raise ConfigError([f"model_type {kind!r} is a mixture of experts the estimate does not know (it knows "
                           f"{', '.join(MOE_WIDTH)})"])
    missing = [name for name in LLAMA_FIELDS if name not in cfg]
    if missing:
        raise ConfigError([f"model_type {kind!r}: its config.json lacks {', '.join(missing)}; the estimate reads "
                           f"Llama-style decoders, gpt2 and {', '.join(MOE_WIDTH)}"])
    heads = cfg["num_attention_heads"]
    if kind in QKV_BIAS and cfg.get("qkv_bias", True):
        biased = ("q_proj", "k_proj", "v_proj")
    else:  # Llama's attention_bias: all four projections (mlp_bias: the MLP's three)
        biased = ("q_proj", "k_proj", "v_proj", "o_proj") if cfg.get("attention_bias") else ()
    if cfg.get("mlp_bias") and not (cfg.get("num_local_experts") or cfg.get("num_experts")):
        biased += ("gate_proj", "up_proj", "down_proj")
    shape = ModelShape(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                       cfg.get("num_key_value_heads") or heads, cfg["vocab_size"],
                       bool(cfg.get("tie_word_embeddings", False)), head_dim=cfg.get("head_dim"),
                       qk_norm=kind in QK_NORM, biased=biased, fused=kind == "phi3",
                       layer_norms=4 if kind in SANDWICH_NORMS else 2)
    count = cfg.get("num_local_experts") or cfg.get("num_experts")
    if kind not in MOE_WIDTH or not count:  # (qwen3_moe with 0 experts: dense MLPs)
        return shape
    width = MOE_WIDTH[kind]
    if width not in cfg:
        raise ConfigError([f"model_type {kind!r}: its config.json lacks {width} (each expert's width)"])
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:  # qwen3_moe: some layers dense
        raise ConfigError([f"model_type {kind!r} with dense layers among the expert ones (mlp_only_layers "
                           f"{cfg.get('mlp_only_layers')}, decoder_sparse_step {cfg.get('decoder_sparse_step')}): "
                           f"the estimate reads {kind} with experts in every layer"])
    return dataclasses.replace(shape, intermediate_size=cfg[width], num_experts=count,
                               experts_per_token=cfg.get("num_experts_per_tok", 2),
                               shared_expert_size=cfg.get("shared_expert_intermediate_size") or 0
                               if kind == "qwen2_moe" else 0)


def gpt2_shape(cfg: dict) -> ModelShape:
    """GPT-2's shape from its config.json names (n_embd, n_layer, n_head, vocab_size, n_positions, n_inner)."""
    missing = [name for name in GPT2_FIELDS if cfg.get(name) is None]
    if missing:
        raise ConfigError([f"model_type 'gpt2': its config.json lacks {', '.join(missing)}"])
    h, heads = cfg["n_embd"], cfg["n_head"]
    return ModelShape(h, cfg.get("n_inner") or 4 * h, cfg["n_layer"], heads, heads, cfg["vocab_size"],
                      bool(cfg.get("tie_word_embeddings", True)), biased=("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                           "mlp.c_proj"),
                      gpt2=True, positions=cfg["n_positions"])


def target_shapes(shape: ModelShape, targets: str | tuple[str, ...] = "all-linear") -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer that `targets` adapts."""
    names = shape.linear_shapes()
    chosen = names if targets == "all-linear" else [t for t in targets if t in names]
    if not chosen:
        raise ValueError(f"targets {targets!r} name no linear layer of a Llama block; use any of {list(names)}")
    return [names[t] for t in chosen]


def adapter_params(shape: ModelShape, r: int, targets: str | tuple[str, ...] = "all-linear",
                   method: str = "lora") -> int:
    """Adapter parameters of every decoder layer: r·(in + out) per targeted linear layer (A and B), plus DoRA's
    magnitude m (out values) or AdaLoRA's singular values E (r values); AdaLoRA's r is its init_r, whose tensors
    stay whole while the allocator prunes (it zeroes E, RankAllocator.mask_to_budget)."""
    per_layer = 0
    for i, o in target_shapes(shape, targets):
        per_layer += r * (i + o) + (o if method == "dora" else r if method == "adalora" else 0)
    return shape.num_hidden_layers * per_layer


def activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, lora_r_per_layer: int,
                     gradient_checkpointing: bool, method: str = "full",
                     targets: str | tuple[str, ...] = "all-linear") -> dict[str, float]:
    """Bytes autograd keeps for the backward pass of a Llama decoder, for `tokens` = batch × seq_len.

    Per layer per token (h hidden, q and kv the query and K/V widths (heads × head_dim), i intermediate, a = bytes
    of an activation), counting the tensors a Llama block saves for backward:
      attention: RMSNorm's fp32 copy of its input (4h) and its output (a·h, the q/k/v input); q, k, v after
                 rotary (a·(q + 2kv)) and the attention output (a·q) saved by SDPA; o_proj's input (a·q)
      MLP:       RMSNorm again (4h + a·h); gate output, SiLU output, up output, their product (4·a·i)
      LoRA:      each adapter's A output (4·r, fp32 adapters), summed over targets: 4·Σr
      → 8h + a·(2h + 3q + 2kv + 4i) + 4·Σr bytes.
    Qwen3's RMSNorms on q and k add their fp32 input copies and outputs: (4 + a)·(q + kv). With experts, the MLP
    term a·4i becomes k·a·(h + 4i) (each of the k experts a token is routed to keeps its copy of the input and
    the four tensors above) plus the router's fp32 probabilities (4·E), plus a·4s for Qwen2-MoE's shared expert
    of width s. GPT-2 is read with the same formula (q = kv = h), its ungated GELU MLP keeping a·2i.
    DoRA (LoraLinear._dora) multiplies m/‖W0 + sBA‖ into two per-token tensors, and a product keeps what it
    multiplies: the base output W0x (a·out) and the adapter's output s·B(A(x)) (4·out, fp32 adapters), per target
    layer: (a + 4)·Σout. Neither is any other op's tensor (the block's ops take base_out + that sum). DoRA and
    AdaLoRA (SVDLinear) run the plain path, which casts x to the fp32 adapters' dtype in every target layer: with
    a < 4 that copy (4·in) is what A keeps, Σ 4·in over the targets (the fused LoRA kernel keeps x as it is).
    The backward of a layer needs room besides what it reads: while the MLP's backward runs, the gradients of its
    product, gate and up outputs and SiLU's recomputed output (4·a·i) live beside the residual stream's gradient and
    the block output's (2·a·h): a·(4i + 2h) per token (with experts k·4·a·i + 2·a·h), once (one layer at a time),
    on top of the saved tensors.
    With gradient checkpointing only each layer's input stays (a·h per layer per token), plus one layer's full
    set while that layer is recomputed in backward, plus that working room. SDPA's attention needs no (seq × seq)
    matrix.
    The output head, trained (method full), runs in HEAD_CHUNK-row chunks too (loss.CausalLMLoss, not fused): each
    chunk's log-softmax output (4·V per token, fp32) stays for backward, for every token, and backward holds one
    chunk's two fp32 gradients (of the log-softmax output and of the logits: 8·V per row) at a time, more than the
    forward's one chunk of logits (a·V, plus an fp32 copy where a < 4). Frozen (the adapter methods),
    the loss runs the head fused, HEAD_CHUNK rows at a time, and keeps only the gradient of its input (a·h per
    token): one chunk's logits (a·V, plus an fp32 copy where a < 4) are alive at once, whatever the number of tokens.
    """
    h, q, kv, i, L, V = (shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size,
                         shape.num_hidden_layers, shape.vocab_size)
    if shape.num_experts:
        shared = act_bytes * 4 * shape.shared_expert_size  # Qwen2-MoE's shared expert: every token, like a dense MLP
        mlp = shape.experts_per_token * act_bytes * (h + 4 * i) + 4 * shape.num_experts + shared
        mlp_backward = shape.experts_per_token * act_bytes * 4 * i + shared
    else:
        mlp = act_bytes * (2 if shape.gpt2 else 4) * i  # GPT-2: c_fc's output and GELU's, no gate
        mlp_backward = mlp
    qk_norm = (4 + act_bytes) * (q + kv) if shape.qk_norm else 0
    adapted = target_shapes(shape, targets) if method in ("dora", "adalora") else []
    dora = (act_bytes + 4) * sum(out for _, out in adapted) if method == "dora" else 0  # W0x and s·B(A(x))
    cast = 4 * sum(fan_in for fan_in, _ in adapted) if act_bytes < 4 else 0  # each target's fp32 copy of its input
    per_layer_token = (8 * h + act_bytes * (2 * h + 3 * q + 2 * kv) + mlp + qk_norm + 4 * lora_r_per_layer
                       + dora + cast)
    backward = mlp_backward + 2 * act_bytes * h  # one layer's working room in its backward
    if gradient_checkpointing:
        layers = tokens * (L * act_bytes * h + per_layer_token + backward)
    else:
        layers = tokens * (L * per_layer_token + backward)
    chunk = min(tokens, HEAD_CHUNK)
    if method == "full":  # every chunk's log-softmax output, and one chunk's two gradients in backward
        logits = tokens * 4 * V + chunk * 8 * V
    else:  # the fused head's chunk (plus its fp32 copy where a < 4) and the gradient of its input
        logits = chunk * V * (act_bytes + (4 if act_bytes < 4 else 0)) + tokens * act_bytes * h
    return {"layers": float(layers), "logits": float(logits)}


def estimate(model: str | ModelShape, method: str = "qlora", batch_size: int = 1, seq_len: int = 512, r: int = 16,
             targets: str | tuple[str, ...] = "all-linear", optimizer: str = "adamw", dtype: str = "bf16",
             gradient_checkpointing: bool | None = None) -> dict[str, float]:
    """Expected training memory in bytes: weights, adapter, gradients, optimizer_states, activations, total.

    `dtype` is the frozen base's and the activations' dtype. Gradient checkpointing defaults to on for QLoRA
    (prepare_for_kbit_training turns it on) and off otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {list(METHODS)}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer {optimizer!r} is not one of {list(OPTIMIZER_STATE_BYTES)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPE_BYTES)}")
    shape = model_shape(model)
    if gradient_checkpointing is None:
        gradient_checkpointing = method == "qlora"
    a = DTYPE_BYTES[dtype]
    if method == "full":
        weights, trainable, lora_r = 4.0 * shape.total_params, shape.total_params, 0
    elif method != "qlora":  # lora, dora, adalora: the frozen base in `dtype`
        weights = float(a * (shape.linear_params + shape.expert_params + shape.embedding_params)
                        + 4 * shape.norm_params)
        trainable = adapter_params(shape, r, targets, method)
    else:
        weights = QLORA_BITS / 8 * shape.linear_params + 4 * (shape.embedding_params + shape.norm_params
                                                              + shape.expert_params)
        trainable = adapter_params(shape, r, targets)
        a = 4  # fp32 norms and head: the hidden states stay fp32 (the 4-bit matmuls cast in and out)
    adapter = 0.0 if method == "full" else 4.0 * trainable
    if method != "full":  # Σr over one layer's targets: the A outputs (AdaLoRA: x(A∘E)ᵀ) saved for backward
        lora_r = r * len(target_shapes(shape, targets))
    acts = activation_bytes(shape, batch_size * seq_len, a, lora_r, gradient_checkpointing, method, targets)
    states = OPTIMIZER_STATE_BYTES[optimizer] * trainable
    if method == "adalora":  # RankAllocator's two fp32 EMAs (sensitivity, uncertainty) per adapter value
        states += 8.0 * trainable
    out = {"weights": weights, "adapter": adapter, "gradients": 4.0 * trainable, "optimizer_states": states,
           "activations": acts["layers"] + acts["logits"]}
    out["total"] = sum(out.values())
    out["trainable_params"] = float(trainable)
    out["gradient_checkpointing"] = float(gradient_checkpointing)
    return out


def per_device(breakdown: dict[str, float], model: str | ModelShape, method: str, gpus: int, distributed: str,
               dtype: str = "bf16") -> dict[str, float]:
    """Memory per device with `gpus` processes, each running `breakdown`'s micro-batch (batch_size is per device).

    ddp: every device holds the whole breakdown, plus DDP's gradient buckets (a second copy of the gradients,
         "buffers"). fsdp: weights, adapter, gradients and optimizer states are split in `gpus` shards; "buffers"
         is what FSDP gathers whole at a time: the root (embeddings, head, final norm) for the whole step and two
         decoder layers (the one computing and the one prefetched), in the compute dtype (QLoRA: 4-bit layers).
    """
    if distributed not in ("ddp", "fsdp"):
        raise ValueError(f"distributed {distributed!r} is not one of ['ddp', 'fsdp']")
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    out = dict(breakdown)
    if distributed == "ddp":
        out["buffers"] = breakdown["gradients"] if gpus > 1 else 0.0
    else:
        shape, a = model_shape(model), DTYPE_BYTES[dtype]
        for part in ("weights", "adapter", "gradients", "optimizer_states"):
            out[part] = breakdown[part] / gpus
        layer_linear, layer_experts = (shape.linear_params / shape.num_hidden_layers,
                                       shape.expert_params / shape.num_hidden_layers)
        layer_bytes = ((QLORA_BITS / 8 if method == "qlora" else (4 if method == "full" else a)) * layer_linear
                       + (4 if method in ("full", "qlora") else a) * layer_experts)
        root_bytes = (4 if method in ("full", "qlora") else a) * (shape.embedding_params + shape.hidden_size)
        out["buffers"] = (root_bytes + 2 * layer_bytes) if gpus > 1 else 0.0
    out["total"] = sum(out[p] for p in ("weights", "adapter", "gradients", "optimizer_states", "activations",
                                        "buffers"))
    return out


def count_text(n: float) -> str:
    """A parameter count as a title says it: 6.74B, 40.0M, or every digit below a million (a tiny model's
    197,952 read "0.2M", and a LoRA of a few thousand "0.0M")."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{int(n):,}"


def format_breakdown(breakdown: dict[str, float], title: str = "") -> str:
    """The breakdown as a small table in GB."""
    parts = ["weights", "adapter", "gradients", "optimizer_states", "activations",
             *(["buffers"] if "buffers" in breakdown else []), "total"]
    lines = text_table(["part", "GB"], [[part, f"{breakdown[part] / GB:.2f}"] for part in parts])
    return "\n".join(([title] if title else []) + lines)


def cli_estimate(model: NonEmpty = "7b", method: Literal["full", "lora", "qlora", "dora", "adalora"] = "qlora",
                 batch_size: PositiveInt = 1, seq_len: PositiveInt = 512, r: PositiveInt = 16,
                 optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw",
                 dtype: Literal["bf16", "fp16", "fp32"] = "bf16", gradient_checkpointing: bool = False,
                 no_gradient_checkpointing: bool = False, gpus: PositiveInt = 1,
                 distributed: Literal["ddp", "fsdp"] = "ddp") -> None:
    """`loraforge estimate`: cli.estimate's docstring is its help (it is defined there, where the CLI's help
    is built without importing torch)."""
    if r > MAX_RANK:  # as lora.r in a run
        raise ConfigError([f"--r: {r} is more than the largest rank a run takes ({MAX_RANK}); typical ranks are 4-64"])
    if batch_size * seq_len > MAX_TOKENS:  # soak: past a float's range the sums below were an OverflowError
        raise ConfigError([f"--batch-size {digits_shown(batch_size)} × --seq-len {digits_shown(seq_len)}: more than "
                           f"{MAX_TOKENS:.0e} tokens a micro-batch, past any device's memory; typical is 1-64 × "
                           f"512-8192"])
    if gpus > MAX_GPUS:
        raise ConfigError([f"--gpus {digits_shown(gpus)}: more than {MAX_GPUS:.0e} devices, past any cluster"])
    if gradient_checkpointing and no_gradient_checkpointing:
        raise ConfigError(["--gradient-checkpointing and --no-gradient-checkpointing: give one of them (or neither "
                           "for the method's default)"])
    try:
        shape = model_shape(model)
    except ConfigError as e:  # an architecture the estimate can't read
        raise ConfigError([f"--model {model!r}: {p}" for p in e.problems]) from None
    except ValueError:  # soak: a model's config.json, or a folder there under another Unicode form or case, unsaid
        where = (f" is a file; give the folder that holds it ({Path(model).parent}) if that is the model's, or"
                 if expand_user(model).is_file() else f"{missing_note(model)}:")
        raise ConfigError([f"--model {model!r}{where} give a known size ({', '.join(KNOWN_SHAPES)}), a "
                           f"transformers directory or a built-in model ({', '.join(BUILTIN_MODELS)})"]) from None
    except OSError as e:  # a directory without a readable config.json
        raise ConfigError([f"--model {model!r}: {e}"]) from None
    if model.lower() in KNOWN_CONFIGS:  # as data.max_seq_len in a run
        check_fits_context(seq_len, KNOWN_CONFIGS[model.lower()], field="--seq-len")
    else:
        try:
            config = load_config(model)
        except Exception as e:  # noqa: BLE001 -- an unknown model_type, a field its config class refuses, ...
            reason = " ".join(line.strip() for line in str(e).splitlines()).split(". ")[0]  # not the upgrade advice
            raise ConfigError([f"--model {model!r}: transformers cannot read its config.json ({reason})"]) from None
        check_fits_context(seq_len, config, field="--seq-len")
    ckpt = True if gradient_checkpointing else (False if no_gradient_checkpointing else None)
    result = estimate(shape, method, batch_size, seq_len, r, "all-linear", optimizer, dtype, ckpt)
    rank = "" if method == "full" else f"r={r}, "
    title = (f"{model} {method}: batch {batch_size} × {seq_len} tokens, {rank}{optimizer}, {dtype}, "
             f"gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'}, "
             f"{count_text(result['trainable_params'])} trainable parameters")
    if gpus > 1 or distributed == "fsdp":
        result = per_device(result, shape, method, gpus, distributed, dtype)
        title += f"; per device with {gpus} × {distributed}"
    print(format_breakdown(result, title))
