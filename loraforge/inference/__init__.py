"""Inference: a lean decode step over a static KV cache for Llama-family models, the base stored in fp32, bf16
or int8, the adapters applied per row."""
