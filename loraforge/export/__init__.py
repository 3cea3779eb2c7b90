"""Take a result elsewhere: GGUF for llama.cpp / Ollama / LM Studio, a checked adapter for vLLM.

    gguf_names.py  transformers names and layouts -> llama.cpp's (the one hand-written mapping)
    gguf.py        the merged model as one GGUF file (`loraforge export --to gguf`)
    gguf_lora.py   the adapter alone as llama.cpp's LoRA GGUF, and its Ollama NAME.Modelfile (`--to gguf-lora`)
    vllm.py        what vLLM serves: refuse, or convert exactly into a plain uniform-rank adapter (`--to vllm`)
"""
