"""Quantized (bitsandbytes) base layers: 4-bit NF4/FP4 and 8-bit, and the one place that recognises them."""
