"""The LoRA family: the adapter layer, injection, PEFT-format files, merging, AdaLoRA."""
