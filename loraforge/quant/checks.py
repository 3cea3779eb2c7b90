"""The one place that recognises bitsandbytes layers and parameters, without importing bitsandbytes.

By class name, so a model can be inspected where bitsandbytes is not installed (it then has none of them).
"""

from __future__ import annotations

from torch import nn

QUANTIZED_PARAMS = ("Params4bit", "Int8Params")
QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")


def is_4bit_param(p) -> bool:
    """A bnb 4-bit weight (NF4/FP4 codes packed two per byte)."""
    return type(p).__name__ == "Params4bit"


def is_8bit_param(p) -> bool:
    return type(p).__name__ == "Int8Params"


def is_quantized_param(p) -> bool:
    """A weight stored by bitsandbytes (4-bit or 8-bit): not a float tensor that can be trained or cast."""
    return type(p).__name__ in QUANTIZED_PARAMS


def is_quantized(layer: nn.Module) -> bool:
    """A layer whose weight bitsandbytes stores (Linear4bit, Linear8bitLt)."""
    return is_quantized_param(getattr(layer, "weight", None))


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes linear layer, by its class."""
    return type(module).__name__ in QUANTIZED_LINEARS


def base_quantization(model: nn.Module) -> str:
    """How bitsandbytes stores `model`'s linear layers: "nf4", "fp4", "int8", or "none" (full precision). A LoRA
    layer's base layer counts: it is the base's own."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if is_4bit_param(weight):
            return str(weight.quant_type)
        if is_8bit_param(weight):
            return "int8"
    return "none"
