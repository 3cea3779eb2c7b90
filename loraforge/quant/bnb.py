"""QLoRA glue over bitsandbytes: 4-bit NF4/FP4 (or 8-bit) base layers, de-quantizing, prepare-for-k-bit.

QLoRA (Dettmers et al. 2023) stores each frozen linear weight as 4-bit codes in blocks of 64, one absmax per
block; with double quantization the fp32 absmax values are themselves quantized to 8 bits in blocks of 256
(minus their mean, the "offset"), with one fp32 absmax per 256 blocks. Bits per weight:

    4 + 32/64                    = 4.5     (no double quantization)
    4 + 8/64 + 32/(64·256)       ≈ 4.127   (double quantization)

plus two code tables per tensor (16 and 256 fp32 values). Only nn.Linear layers are quantized: embeddings,
norms and the output head stay in the compute dtype. The LoRA layer wraps the bitsandbytes layer unchanged.

bitsandbytes ≥ 0.48 runs 4-bit on CPU too. One CPU detail: on CPUs with AVX512-BF16, bnb repacks a Linear4bit
into a CPU-only layout the first time it runs in eval mode without gradients, casting absmax to bf16 (a lossy,
silent change of the stored weights and of their format). We switch that off per layer, so the stored weights
stay what we quantized, `dequantize` stays exact and a model gives the same logits in train and eval mode.
On the same CPUs, importing bitsandbytes (0.49+) tries to fetch that layout's matmul from the Hugging Face Hub
("kernels-community") and logs a warning when it cannot (offline, or the hub's trust check): we never run that
kernel, so `import_bitsandbytes` drops that one line.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging

import torch
from torch import nn

from loraforge.config import ConfigError
from loraforge.quant.checks import is_4bit_param, is_8bit_param, is_quantized_param
from loraforge.utils.allocator import drop_file_pages, trim_heap
from loraforge.utils.hf import enable_checkpointing

QUANT_TYPES = ("nf4", "fp4", "int8")
QUANTIZED_FROM = torch.bfloat16
"""What every weight is rounded to before it is quantized, whatever the compute dtype: a base quantized for a bf16
run, an fp32 run, `merge --quantize` (fp32) and `serve` is the same codes (it differed by the rounding: a bf16
run's adapter merged into a base re-quantized from fp32 gave logits 0.025 off), and the one transformers and PEFT
build for QLoRA's usual torch_dtype=bfloat16. bf16's rounding (2^-9) is far below a 4-bit step (~1/8 of a block's
absmax) or an 8-bit one."""
BLOCKSIZE = 64  # weights per absmax (QLoRA's choice; bnb's default)
NESTED_BLOCKSIZE = 256  # absmax values per second-level absmax with double quantization


def _check_quantize(quantize: str) -> None:
    if quantize not in QUANT_TYPES:
        raise ValueError(f"quantization {quantize!r} is not supported; use one of {list(QUANT_TYPES)} or null")


def check_device(device: str | torch.device) -> None:
    """A CUDA device where torch has none: one line naming the argument (torch's own is a bare AssertionError,
    "Torch not compiled with CUDA enabled", from deep inside bitsandbytes' move)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device={str(device)!r}: {why} (torch {torch.__version__}); use device='cpu'")


WORDS = ("python", "config", "flag")
"""Whom the CPU width refusal speaks to: the Python API (quantize_model(model, 'nf4'): a ValueError), a run's setting
(train, demo, the studies: model.quantization or --quantize, a ConfigError), or the --quantize of a command that
runs on the CPU and takes no config (generate, eval, serve, ui, merge: a ConfigError naming the flag alone)."""


def check_cpu_widths(linears: list[tuple[str, nn.Module]], quantize: str, device: str | torch.device,
                     words: str = "python") -> None:
    """Refuse 4 bits on CPU for linear layers whose in_features is not a multiple of 64, naming the first such
    layer (by its path), its width, and what to use instead; before any layer is quantized. `words`: one of WORDS.
    Soak: `generate --quantize nf4` was told "leave quantization off (method lora), or run on a GPU", training's
    words, where generate has no method and runs on the CPU whatever the machine.

    Blocks of 64 run over the flattened weight, so they cross rows when in_features % 64 != 0; bnb 0.50's CPU
    dequantize/matmul kernel then applies the wrong absmax to part of each row (measured: its de-quantized weight
    is further from the original than the flat-block reading that quantize wrote).
    """
    if quantize == "int8" or torch.device(device).type != "cpu":
        return
    bad = [(path, m.in_features) for path, m in linears if m.in_features % BLOCKSIZE]
    if not bad:
        return
    path, width = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    why = (f"on CPU needs every linear layer's in_features to be a multiple of {BLOCKSIZE} (bitsandbytes' CPU 4-bit "
           f"kernels), but {path} has in_features={width}{more}")
    if words == "python":
        raise ValueError(f"quantize {quantize!r} {why}; use 'int8', leave the model unquantized, or quantize on a GPU "
                         f"(device='cuda')")
    if words == "flag":
        raise ConfigError([f"--quantize {quantize} {why}; use --quantize int8, or leave --quantize off for the "
                           f"full-precision base"])
    raise ConfigError([f"model.quantization: {quantize} {why}; use --quantize int8 (model.quantization: int8), "
                       f"leave quantization off (method lora), or run on a GPU"])


def check_model_widths(model: nn.Module, quantize: str, device: str | torch.device = "cpu",
                       words: str = "flag") -> None:
    """check_cpu_widths for the layers quantize_model would replace in `model`, which may be a skeleton on the meta
    device (models.model_skeleton): a command's --quantize refused before its base loads."""
    check_cpu_widths(_quantizable(model), quantize, device, words=words)


class _NoKernelHubNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning (see the module
    docstring): it names a kernel loraforge never calls and asks for a `pip install kernels` that does not help."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


class _Once(logging.Filter):
    """Lets each distinct message through once: bitsandbytes' int8 matmul logs "MatMul8bitLt: inputs will be cast
    from torch.float32 to float16 during quantization" on every call in eval mode (2,940 lines from the held-out
    pass of the demo's 6 steps)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _missing(needed_by: list[str]) -> ConfigError:
    return ConfigError([f"{setting} needs bitsandbytes, which is not installed here: pip install 'loraforge[quant]' "
                        f"(or pip install bitsandbytes)" for setting in needed_by])


def check_bitsandbytes(quantization: str | None, optimizer: str) -> None:
    """ConfigError when a run's settings need bitsandbytes (a 4/8-bit base, an 8-bit or, on CUDA, paged optimizer)
    and it is not installed. Called before anything loads: import_bitsandbytes found it missing only once the base
    was loaded (15 s for the built-in model; a hub model's whole download). Nothing is imported."""
    paged_here = optimizer.startswith("paged_") and torch.cuda.is_available()  # elsewhere it runs unpaged
    needed_by = [f"model.quantization (--quantize): {quantization}"] if quantization else []
    needed_by += [f"training.optimizer: {optimizer}"] if optimizer.endswith("_8bit") or paged_here else []
    if needed_by and importlib.util.find_spec("bitsandbytes") is None:
        raise _missing(needed_by)


def import_bitsandbytes(needed_by: str = "4-bit and 8-bit layers"):
    """The bitsandbytes module (an optional dependency: the `quant` extra), imported without the notice above;
    its int8 matmul's per-call warning is said once per input dtype from then on. Not installed: a ConfigError
    naming `needed_by` (the setting that asked for it, e.g. "training.optimizer: adamw_8bit") and the install."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    quiet = _NoKernelHubNotice()
    logger.addFilter(quiet)
    try:
        import bitsandbytes
    except ModuleNotFoundError as e:
        if e.name != "bitsandbytes":
            raise  # one of its own imports: its message names what
        raise _missing([needed_by]) from None
    finally:
        logger.removeFilter(quiet)
    matmul_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in matmul_logger.filters):
        matmul_logger.addFilter(_Once())
    return bitsandbytes


def _output_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def quantize_linear(linear: nn.Linear, quantize: str, compute_dtype: torch.dtype = torch.bfloat16,
                    double_quant: bool = True, device: str | torch.device = "cpu",
                    quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight in 4 or 8 bits on `device` (the bias stays in float).

    `quant_storage`: the dtype the packed 4-bit codes are viewed as (bnb's default uint8; a float dtype for FSDP,
    whose parameters must be floating point, as FSDP-QLoRA does). The same bytes either way.
    """
    _check_quantize(quantize)
    check_device(device)
    bnb = import_bitsandbytes(f"model.quantization (--quantize): {quantize}")
    check_cpu_widths([("the linear layer", linear)], quantize, device)
    weight = linear.weight.data.to(QUANTIZED_FROM)  # the same codes whatever the compute dtype
    bias = linear.bias.data if linear.bias is not None else None
    if quantize == "int8":
        # LLM.int8(): per-row absmax int8 weights; outlier input features (|x| > 6) go through fp16 (its default).
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quantize,
                                  quant_storage=quant_storage)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=BLOCKSIZE,
                                         compress_statistics=double_quant, quant_type=quantize, module=layer,
                                         quant_storage=quant_storage)
        layer.support_avx512bf16_for_cpu = False  # keep our stored format (see the module docstring)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    layer = layer.to(device)  # moving a bnb parameter to a device is what quantizes it
    if quantize != "int8":
        layer.weight.quant_state.dtype = compute_dtype  # what de-quantizing gives, as if quantized from it
    return layer


def quantize_model(model: nn.Module, quantize: str, compute_dtype: torch.dtype = torch.bfloat16,
                   double_quant: bool = True, device: str | torch.device = "cpu",
                   quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Replace every nn.Linear but the output head by a bitsandbytes layer, in place, one layer at a time.

    Refuses a model with LoRA layers: merge them first (`merge_and_unload`) or quantize before injecting.
    """
    _check_quantizable(model, quantize, device, words="python")
    return _quantize_layers(model, quantize, compute_dtype, double_quant, device, quant_storage)


def _check_quantizable(model: nn.Module, quantize: str, device: str | torch.device, words: str) -> None:
    """quantize_model's and quantize_loaded's refusals, before the first layer is replaced: an unknown `quantize`,
    LoRA layers, a device that cannot be used, layer widths the CPU kernels get wrong (`words`: check_cpu_widths')."""
    _check_quantize(quantize)
    if has_lora_layers(model):
        raise ValueError("the model has LoRA layers; quantize the base before inject(), or merge_and_unload() first")
    check_device(device)
    check_cpu_widths(_quantizable(model), quantize, device, words=words)  # all of them before the first is replaced


def _quantize_layers(model: nn.Module, quantize: str, compute_dtype: torch.dtype, double_quant: bool,
                     device: str | torch.device, quant_storage: torch.dtype, from_file: bool = False) -> nn.Module:
    """quantize_model's replacement, one layer at a time, each full-precision layer freed as soon as it is replaced
    and the heap trimmed. `from_file`: the model was just loaded from a checkpoint (load_quantized), so a replaced
    weight that is a view of the mapped file is dropped from the resident set too (its bytes are the file's, and
    nothing reads them again)."""
    paths = [path for path, _ in _quantizable(model)]
    for path in paths:
        parent, _, child = path.rpartition(".")
        linear = model.get_submodule(path)
        setattr(model.get_submodule(parent) if parent else model, child,
                quantize_linear(linear, quantize, compute_dtype, double_quant, device, quant_storage))
        weight = linear.weight.data
        del linear
        if from_file and weight.device.type == "cpu" and not _in_use(model, weight):
            drop_file_pages(weight.data_ptr(), weight.numel() * weight.element_size())
        del weight
        trim_heap()  # the layer's bf16 copy and quantizing's temporaries: holes glibc would keep (see load_quantized)
    return model.to(device)


def _in_use(model: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether a parameter or buffer of `model` shares `tensor`'s memory (a weight tied to a replaced one)."""
    ptr = tensor.untyped_storage().data_ptr()
    return any(t.device.type == "cpu" and t.untyped_storage().data_ptr() == ptr
               for t in [*model.parameters(), *model.buffers()] if not is_quantized_param(t))


def has_lora_layers(model: nn.Module) -> bool:
    """Whether `model` holds LoRA layers (loraforge's or PEFT's: a module with lora_A), which quantize_model and
    prepare_for_kbit_training refuse: they belong before inject()."""
    return any(hasattr(m, "lora_A") for m in model.modules())


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of the linear layers quantize_model replaces: every nn.Linear but the output head."""
    head = _output_head(model)
    return [(path, module) for path, module in model.named_modules()
            if type(module) is nn.Linear and module is not head]


def load_quantized(path: str, quantize: str, compute_dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu", double_quant: bool = True,
                   quant_storage: torch.dtype = torch.uint8, stored: torch.dtype | None = None) -> nn.Module:
    """Load a transformers checkpoint directory with its linear layers stored by bitsandbytes.

    We quantize layer by layer ourselves (each weight rounded to QUANTIZED_FROM first) instead of passing
    transformers a BitsAndBytesConfig: that works on CPU too with bnb 0.50 but was an order of magnitude slower for
    the built-in model, and both give the same bnb layers (with torch_dtype bf16). Embeddings, norms and lm_head end
    in `compute_dtype`.

    `stored`: the dtype the checkpoint's weights are stored in (models.stored_dtype), where known. The model is then
    loaded in it, as views of the mapped file, each layer quantized from there and freed (the heap trimmed, the
    file's pages it read dropped from the resident set), and only the float parameters left are cast to
    `compute_dtype`: the same codes and weights. Loading in
    `compute_dtype` first held the whole model in full precision before a layer was quantized (soak: a 4-bit
    fp32-compute run on a 580 MB fp32 checkpoint peaked at 1.42 GB resident, more than the unquantized run's
    1.14 GB; on its bf16 copy the load alone peaked as high as loading it unquantized).
    """
    from transformers import AutoModelForCausalLM

    _check_quantize(quantize)
    # weights_only: a folder of .bin weights (pickles) is read as plain tensors, never run
    model = AutoModelForCausalLM.from_pretrained(path, dtype=stored or compute_dtype, weights_only=True)
    return quantize_loaded(model, quantize, compute_dtype, device, double_quant, quant_storage, from_file=True)


def quantize_loaded(model: nn.Module, quantize: str, compute_dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu", double_quant: bool = True,
                    quant_storage: torch.dtype = torch.uint8, from_file: bool = False) -> nn.Module:
    """A loaded model (from a checkpoint, in `compute_dtype` or the dtype its file stores, or de-quantized from GGUF
    in memory) with its linear layers stored by bitsandbytes and the rest in `compute_dtype`, as `load_quantized`
    gives it. Its refusals are worded for a run's settings (model.quantization, --quantize): load_model is how
    train, merge and serve load a quantized base. `from_file`: just loaded from a checkpoint's mapped file, whose
    pages each replaced weight read are dropped from the resident set (_quantize_layers)."""
    _check_quantizable(model, quantize, device, words="config")
    model = _quantize_layers(model, quantize, compute_dtype, double_quant, device, quant_storage, from_file).eval()
    _to_compute_dtype(model, compute_dtype)
    _own_memory(model)
    return model


def _to_compute_dtype(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """The float parameters quantizing left (embeddings, norms, lm_head) in `compute_dtype`, as loading the model
    in it gives them (a tied head stays tied: one parameter; the model's _keep_in_fp32_modules stay fp32 under
    bf16/fp16), and config.dtype saying so; buffers (RoPE's fp32 inv_freq) as they are."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])  # what transformers keeps fp32 under bf16/fp16
    for name, p in model.named_parameters():
        kept = compute_dtype in (torch.bfloat16, torch.float16) and any(k in name.split(".") for k in keep)
        if p.is_floating_point() and not is_quantized_param(p) and p.dtype != compute_dtype and not kept:
            p.data = p.data.to(compute_dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = compute_dtype


def _own_memory(model: nn.Module) -> None:
    """Give the float tensors left on the CPU (embeddings, norms) memory of their own. transformers loads a
    checkpoint in its own dtype as views of the memory-mapped safetensors file, so one embedding kept the whole
    file's mapping alive, with the pages quantizing had read still resident: +405 MB of RSS for the built-in model
    (its 538 MB fp32 file) over the 160 MB the quantized model holds. Then the heap's holes (the full-precision
    weights quantizing freed) go back to the system."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and not is_quantized_param(tensor):
            tensor.data = tensor.data.clone()
    trim_heap()


# --- de-quantization, in plain PyTorch: it documents the stored format, and the tests check it against bnb ---

def _dequantize_blockwise(codes: torch.Tensor, state) -> torch.Tensor:
    """bnb's 8-bit blockwise format (the nested absmax): code[uint8] · absmax of its block of 256, in fp32."""
    values = state.code[codes.long()]
    scale = state.absmax.float().repeat_interleave(state.blocksize)[: values.numel()]
    return values * scale


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The weight of a bnb Linear4bit / Linear8bitLt as an fp32 (out, in) tensor."""
    weight = layer.weight
    if is_8bit_param(weight):
        scb = weight.SCB if weight.SCB is not None else getattr(layer.state, "SCB", None)
        return weight.data.float() * (scb.float()[:, None] / 127)  # per-row absmax scaling
    if not is_4bit_param(weight):
        raise TypeError(f"dequantize needs a bitsandbytes 4-bit or 8-bit layer, got {type(layer).__name__}")
    state = weight.quant_state
    packed = weight.data
    if getattr(state, "packing_format_for_cpu", False):  # a layer made elsewhere and already run in eval mode
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        packed, state = _convert_weight_packed_for_cpu_inverse(packed, copy.copy(state))  # leaves the layer as is
    packed = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)  # first weight in the high nibble
    if state.nested:
        absmax = _dequantize_blockwise(state.absmax, state.state2) + state.offset  # (n_blocks,)
    else:
        absmax = state.absmax.float()
    n = state.shape.numel()
    values = state.code.float()[codes[:n].long()] * absmax.repeat_interleave(state.blocksize)[:n]
    return values.reshape(state.shape)


def stored_bytes(weight: torch.Tensor) -> dict[str, int]:
    """Bytes a bnb Params4bit really holds: packed codes, absmax (8-bit when nested), nested absmax, code tables."""
    state = weight.quant_state

    def nbytes(t):
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    out = {"codes": nbytes(weight.data), "absmax": nbytes(state.absmax), "nested_absmax": 0,
           "tables": nbytes(state.code)}
    if state.nested:
        out["nested_absmax"] = nbytes(state.state2.absmax)
        out["tables"] += nbytes(state.state2.code) + nbytes(torch.as_tensor(state.offset))
    return out


def stored_bits_per_weight(model: nn.Module) -> float:
    """Measured bits per quantized weight over all 4-bit layers of `model` (code tables included)."""
    total_bits = total_weights = 0
    for p in model.parameters():
        if is_4bit_param(p):
            total_bits += 8 * sum(stored_bytes(p).values())
            total_weights += p.quant_state.shape.numel()
    if not total_weights:
        raise ValueError("the model has no 4-bit layers")
    return total_bits / total_weights


def bits_per_weight_formula(double_quant: bool = True, blocksize: int = BLOCKSIZE) -> float:
    """QLoRA's count: 4-bit codes + 32-bit absmax per block, or 8-bit absmax + 32 bits per 256 blocks."""
    return 4 + (8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE) if double_quant else 32 / blocksize)


# --- training ---

def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Get a quantized base ready for adapter training (PEFT's prepare_model_for_kbit_training).

    Freezes the base; puts every non-quantized float parameter (norms, embeddings, lm_head) in fp32, as PEFT
    does: fp32 norms alone would hand fp32 hidden states to a bf16 lm_head, which fails ("expected m1 and m2
    to have the same dtype"); makes the embedding output require grad (so checkpointed blocks see a graph);
    and turns on gradient checkpointing (non-reentrant) unless told not to. Call it before inject(); a model with
    LoRA layers is refused (it would freeze the adapters). The 4-bit layers cast their input to the compute dtype
    and their output back, so activations are fp32.
    """
    if has_lora_layers(model):
        raise ValueError("the model has LoRA layers: prepare_for_kbit_training freezes every parameter, the adapters' "
                         "too, leaving nothing to train; call it before inject(): quantize_model(model, ...), then "
                         "prepare_for_kbit_training(model), then inject(model, config)")
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and not is_quantized_param(p):
            p.data = p.data.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; "
                             "pass gradient_checkpointing=False")
        enable_checkpointing(model)
        if hasattr(model, "config"):
            model.config.use_cache = False  # a KV cache and checkpointing don't mix in training
    return model


# --- re-quantizing a merged model: an explicit choice, with the error it adds ---

@dataclasses.dataclass
class RequantizeReport:
    quantize: str
    layers: int
    weight_rel_error_mean: float  # mean over layers of ‖Q(W) − W‖ / ‖W‖
    weight_rel_error_max: float
    logits_max_abs_diff: float | None = None  # on the given input_ids, before vs after
    logits_rel_error: float | None = None  # ‖Δlogits‖ / ‖logits‖

    def __str__(self) -> str:
        text = (f"re-quantized {self.layers} linear layers to {self.quantize}: weight error ‖ΔW‖/‖W‖ "
                f"mean {self.weight_rel_error_mean:.4f}, max {self.weight_rel_error_max:.4f}")
        if self.logits_max_abs_diff is not None:
            text += (f"; logits changed by max {self.logits_max_abs_diff:.4f} "
                     f"(relative {self.logits_rel_error:.4f}) on the given inputs")
        return text


@torch.no_grad()
def requantize(model: nn.Module, quantize: str = "nf4", input_ids: torch.Tensor | None = None,
               compute_dtype: torch.dtype | None = None, double_quant: bool = True) -> RequantizeReport:
    """Quantize a merged (plain) model's linear layers again, in place, and report the error this adds.

    Merging ΔW into a 4-bit base gives float weights that are no longer on the 4-bit grid; quantizing them again
    moves every weight by up to half a quantization step, so outputs change. Give `input_ids` to measure the
    change in logits as well.
    """
    head = _output_head(model)
    linears = [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not linears:
        raise ValueError("no nn.Linear layers to quantize; is the model merged (merge_and_unload) and not quantized?")
    check_cpu_widths([(path, m) for path, m in linears if m.weight.device.type == "cpu"], quantize, "cpu")
    dtype = compute_dtype or linears[0][1].weight.dtype
    before = model(input_ids).logits.float() if input_ids is not None else None
    errors = []
    for path, linear in linears:
        original = linear.weight.float()
        layer = quantize_linear(linear, quantize, dtype, double_quant, linear.weight.device)
        errors.append(((dequantize(layer) - original).norm() / original.norm()).item())
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    report = RequantizeReport(quantize, len(errors), sum(errors) / len(errors), max(errors))
    if input_ids is not None:
        after = model(input_ids).logits.float()
        report.logits_max_abs_diff = (after - before).abs().max().item()
        report.logits_rel_error = ((after - before).norm() / before.norm()).item()
    return report
