"""Training speed and memory: loraforge against PEFT + transformers on the same work, in one run.

    python bench/train.py                          # auto precision, 2 interleaved rounds (2-core CPU: ~3 min)
    python bench/train.py --dtypes bf16,fp32       # explicit precisions (bf16 on a CPU without it: 50-200x slower)
    python bench/train.py --steps 4 --rounds 3     # longer, steadier (GPU: use --batch 16 --steps 20)
    python bench/train.py --variants peft,lf,lf-noprefix,lf-noblocks,lf-eager,lf-unfused,lf-pack,lf-ckpt
                                                   # what each pays
    python bench/train.py --shapes text,chat --variants peft,lf,lf-noseg   # data without a shared prefix

Data shapes (bench/shapes.py; --shapes, all three by default): demo (the demo's rows, a shared 38-token prefix),
chat (distinct system prompts of 1-5 sentences, seeded), text (the shipped general text's articles packed into
--text-len = 512-token rows, --text-rows 4 a step, the same packed rows for every trainer; --text-docs N: the
articles joined and cut into documents of N tokens instead). The table has one block per shape and precision.

The work: the built-in SmolLM2-135M, LoRA r=16 (alpha 32, no dropout) on every linear layer of the decoder, the
shape's data (demo and chat: prompt tokens unsupervised; text: every token), the same example order, the same effective
batch, the same steps, fused AdamW (the HF Trainer's default optimizer; lr 1e-3, no weight decay), gradient clipping at
1.0, the same LoRA A initialisation.

    peft   a straightforward loop: PEFT get_peft_model, padded micro-batches with an attention mask, model(**batch,
           labels=...).loss (full-vocabulary logits on every position), autocast(bf16 or fp16) over an fp32
           model as the HF Trainer does with bf16=True (fp16=True: with a gradient scaler).
    lf     loraforge's training path with its defaults (loraforge.training.loop pieces): packing where it pays
           (data.packing=auto: the demo data is 5% padding, so padded rows), the LM head only on supervised
           positions (loraforge.training.loss.CausalLMLoss), the fused LoRA autograd node (loraforge.kernels,
           training.fused_lora), lean RMSNorm and SwiGLU MLP nodes (training.fused_blocks), the lean attention
           kernel on CPU for short rows (training.attention=auto; PEFT runs transformers' default SDPA), in
           bf16/fp16 the frozen base stored in that dtype with fp32 adapters, and the prefix that all rows of a
           micro-batch share computed once (training.share_prefix; on the demo data SmolLM2's chat template puts
           the same system prompt and user header, 38 tokens, before every question). Packed rows attend
           sequence by sequence (kernels.packed_attention; lf-noseg: the whole row with its (T, T) mask), the
           queries of a sequence over 256 positions in blocks of 128 (lf-wholeseq: all at once); the
           attention backward recomputes the probabilities of packed rows and of unpacked rows over 256 positions
           (lf-keepprobs, lf-nopack-keepprobs: kept from the forward instead). lf-buffer: the activations kept
           for the backward copied into a buffer that lives for the run and glibc's heap trimmed every 256 MiB of
           them (training.activation_buffer=true): a lower peak at some speed. On glibc the steps run with large
           blocks served from the heap and the heap untrimmed where rows are packed (training.reuse_memory=auto, as
           train() runs), and then the kept activations copied into that buffer without trims
           (training.activation_buffer=auto); lf-noreuse: neither, lf-nobuffer: no copies, peft-reuse: PEFT's loop
           with the heap kept. The fused head keeps its chunk of logits from step to step (kernels.HeadBuffers;
           lf-freshhead: allocated afresh every step).

The memory allocator: every trainer runs with the C library's malloc unless the variant says otherwise. lf-jemalloc
and peft-jemalloc run the same trainer with jemalloc preloaded (LD_PRELOAD; Debian/Ubuntu: apt-get install
libjemalloc2) and MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 unless MALLOC_CONF is set: jemalloc reuses freed
activations where glibc's heap fragments, and keeps them for the next step instead of faulting fresh pages in
(docs/PERFORMANCE.md, "Memory on CPU"); lf-jemalloc-decay: jemalloc with its own page decay (MALLOC_CONF empty).
lf-mmap1m: glibc with MALLOC_MMAP_THRESHOLD_=1 MiB (every larger block returned when freed, faulted in again).

What a part of the step costs (bench/free_parts.py, timing only): lf-free-attention, -softmax, -lora, -mlp-act,
-norm and -attention-lora run loraforge's step with that part made almost free (its math wrong, its losses not the
model's), an upper bound of what making the part faster could give.

Each trainer runs in its own subprocess (peak RSS is a process-lifetime maximum); the trainers alternate in short
rounds so that load from other processes on a shared machine falls on all of them alike, and medians are reported.
Tokens/s counts real (non-pad) tokens only. Roofline: the useful FLOPs of a step (frozen linears forward + input
gradient, LoRA forward + both gradients, causal attention, the head forward + input gradient on supervised
positions only; the same count for every trainer) per second, over the peak torch.matmul rate of this machine in
that dtype, measured in the same run: a speed in the units of the machine's peak. Matmul use: the FLOPs each
trainer actually ran per second over the same peak: its padding and its head on every position (PEFT), less a
prefix it ran once for all rows and with packed rows' attention sequence by sequence (loraforge). Where a trainer
skips work the count includes (a shared prefix), its roofline can pass 100%; matmul use cannot. Ceiling (a line
per data shape and precision under the table): the tokens/s of a step whose only cost were the frozen linears and
the head (forward + input gradient: the part of the count that every trainer runs as large products) at that peak,
and its ratio to the baseline. No trainer that runs those products passes it, except by skipping counted work (a
shared prefix).

Precision: --dtypes auto (the default) is what loraforge.precision.choose picks on this device, resolved once
(bf16 on CUDA >= 8.0 and on CPUs with AVX-512 BF16/AMX, fp16 with a gradient scaler on older GPUs, fp32 on a CPU
without native bf16); the table's header says which and why, and names the CPU (model, the ISA torch dispatches
to, cores), as does the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shapes as data_shapes  # noqa: E402
import free_parts  # noqa: E402
from flags import at_least  # noqa: E402
from hardware import auto_precision, describe, header  # noqa: E402
from loraforge.models import ModelDownloadError, ModelFilesError, resolve_model  # noqa: E402
from loraforge.precision import PRECISIONS, TORCH_DTYPES, autocast as precision_autocast  # noqa: E402
from loraforge import kernels as K  # noqa: E402
from loraforge.training.fastpath import LEAN_ATTENTION, LEAN_KEEP_ATTENTION, LEAN_WHOLE_ATTENTION  # noqa: E402
from loraforge.training.fastpath import joins_rows, runs_by_sequence  # noqa: E402
from loraforge.training import data as D  # noqa: E402
from loraforge.training.data import targets  # noqa: E402
from loraforge.training.slab import hold_memory  # noqa: E402
from loraforge.utils import allocator  # noqa: E402

LEAN_BY_SEQUENCE = (LEAN_ATTENTION, LEAN_KEEP_ATTENTION, LEAN_WHOLE_ATTENTION)  # run packed sequences one by one

# name -> (trainer, options). lf: loraforge's defaults (every speed-up that pays); the others switch one off or on.
VARIANTS = {
    "peft": ("peft", {}),
    "lf": ("lf", {}),
    "lf-unfused": ("lf", {"fused": False}),
    "lf-noblocks": ("lf", {"blocks": False}),  # RMSNorm and SwiGLU MLP as transformers has them
    "lf-eager": ("lf", {"attention": "eager"}),  # transformers' eager attention instead of the lean kernel
    "lf-sdpa": ("lf", {"attention": "sdpa"}),  # transformers' SDPA (the previous default for rows over 512)
    "lf-before": ("lf", {"blocks": False, "attention": "eager"}),  # the defaults of the previous release
    "lf-ckpt": ("lf", {"checkpointing": True}),
    "lf-ckpt10": ("lf", {"checkpointing": 10}),  # 10 of the 30 decoder layers recompute
    "lf-pack": ("lf", {"packing": True}),
    "lf-padded": ("lf", {"join": False}),  # packed rows padded to the longest, not joined (data.join_rows)
    "lf-joinany": ("lf", {"join_multiple": 1}),  # joined rows not padded to a multiple of data.JOIN_MULTIPLE
    "lf-nopack": ("lf", {"packing": False}),
    "lf-fullhead": ("lf", {"full_head": True}),
    "lf-plainhead": ("lf", {"plain_head": True}),  # head + cross-entropy under autograd, not the fused node
    "lf-noprefix": ("lf", {"share_prefix": False}),  # every row computes the prefix all rows share
    "lf-keepprobs": ("lf", {"keep_probs": True}),  # attention keeps its probabilities instead of recomputing them
    "lf-nopack-keepprobs": ("lf", {"packing": False, "keep_probs": True}),
    "lf-jemalloc": ("lf", {"allocator": "jemalloc"}),  # the worker runs with LD_PRELOAD=libjemalloc
    "lf-jemalloc-keepprobs": ("lf", {"allocator": "jemalloc", "keep_probs": True}),
    "peft-jemalloc": ("peft", {"allocator": "jemalloc"}),
    "lf-jemalloc-decay": ("lf", {"allocator": "jemalloc", "malloc_conf": ""}),  # jemalloc with its own page decay
    "lf-mmap1m": ("lf", {"mmap_threshold": 1 << 20}),  # glibc: every block over 1 MiB mmapped, returned when freed
    "lf-buffer": ("lf", {"buffer": True}),  # kept activations copied to a run-long buffer, glibc's heap trimmed
    "lf-nobuffer": ("lf", {"buffer": False}),  # not copied (auto copies them where the heap is kept: packed rows)
    "lf-noreuse": ("lf", {"reuse": False}),  # training.reuse_memory off: glibc maps, faults in and unmaps big blocks
    "peft-reuse": ("peft", {"reuse": True}),  # PEFT's loop with glibc held as training.reuse_memory holds it
    "lf-freshhead": ("lf", {"fresh_head": True}),  # the fused head's logits buffers allocated afresh every call
    "lf-head1024": ("lf", {"head_chunk": 1024}),  # the fused head's logits in chunks of 1,024 rows (default 512)
    "lf-noseg": ("lf", {"by_sequence": False}),  # packed rows: lean attention over the whole row's (T, T) mask
    "lf-wholeseq": ("lf", {"query_blocks": False}),  # packed sequences' queries at once (over 256: blocks of 128)
    "lf-prefix": ("lf", {"share_prefix": True}),  # the shared prefix on any device (auto: CPU only)
    "lf-fp32base": ("lf", {"fp32_base": True}),
    "lf-compile": ("lf", {"compile": True}),
    "lf-compile-ckpt10": ("lf", {"compile": True, "checkpointing": 10}),
    # timing only, wrong math (bench/free_parts.py): the step with one part of loraforge's made free
    **{f"lf-free-{part}": ("lf", {"free": (part,)}) for part in free_parts.PARTS},
    "lf-free-attention-lora": ("lf", {"free": ("attention", "lora")}),
}


# ------------------------------------------------------------------------------------------------- the worker

def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux ≥ 4.0: VmHWM := VmRSS); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss_mb() -> float | None:
    """VmHWM: the peak RSS since reset_peak_rss() (or since the start), in MiB; None off Linux."""
    (peak,) = _status_mb("VmHWM")
    return peak


def rss_peak_and_now_mb() -> tuple[float, float | None]:
    """The resident set's peak so far (VmHWM) and now (VmRSS), in MiB, from one read of /proc/self/status: the
    kernel computes both at once, so peak ≥ now (two reads can see the set grow a page in between). Off Linux:
    getrusage's peak and None."""
    peak, now = _status_mb("VmHWM", "VmRSS")
    return (peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), now


def _status_mb(*keys: str) -> tuple[float | None, ...]:
    """The /proc/self/status fields `keys` (kB) in MiB, from one read, in order; None for each one off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for key in keys:
        line = next((x for x in lines if x.startswith(key + ":")), None)
        found.append(None if line is None else int(line.split()[1]) / 1024)
    return tuple(found)


def same_lora_init(model) -> int:
    """A = kaiming_uniform(a=√5) seeded by the wrapped layer's path, B = 0: identical adapters in PEFT and loraforge."""
    import torch

    n = 0
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if lora_A is None or "default" not in lora_A:
            continue
        path = name.removeprefix("base_model.model.")  # PEFT's wrapper prefix
        g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
        with torch.no_grad():
            w = module.lora_A["default"].weight
            w.copy_(torch.nn.init.kaiming_uniform_(torch.empty(w.shape), a=math.sqrt(5), generator=g))  # CPU RNG
            module.lora_B["default"].weight.zero_()
        n += 1
    return n


def useful_flops(examples, model_config, lora_params: int) -> float:
    """FLOPs a LoRA step has to do for these examples (see the module docstring); the same for every trainer."""
    total = 0.0
    for ex in examples:
        total += row_flops(len(ex.input_ids), model_config, lora_params)
        total += targets(ex) * 4 * model_config.hidden_size * model_config.vocab_size  # head forward + dx, supervised
    return total


def executed_flops(rows: int, width: int, prefix: int, head_rows: int, model_config, lora_params: int,
                   sequences: list[int] | None = None) -> float:
    """The FLOPs a micro-batch of `rows` × `width` (padding included) runs when a `prefix` runs once for all rows
    and the head runs on `head_rows` positions (gradient-checkpointing recomputation not counted). `sequences`: the
    lengths of the packed sequences where attention runs each on its own (loraforge's lean attention on packed rows),
    whose causal attention replaces the whole rows'."""
    decoder = rows * row_flops(width, model_config, lora_params) - (rows - 1) * row_flops(prefix, model_config,
                                                                                          lora_params)
    if sequences is not None:
        decoder += sum(attention_flops(n, model_config) for n in sequences) - rows * attention_flops(width,
                                                                                                  model_config)
    return decoder + head_rows * 4 * model_config.hidden_size * model_config.vocab_size


def lf_batch(rows: list, pack: bool, max_seq_len: int, model, opts: dict, pad_id: int) -> dict:
    """A micro-batch collated as loraforge's loop collates it (loop.make_batch): packed where it packs, and packed
    rows joined (data.join_rows), to a multiple of data.JOIN_MULTIPLE positions, where its attention runs packed
    sequences one by one (fastpath.joins_rows; lf-padded: not joined; lf-joinany: joined, not to the multiple)."""
    rows = D.pack(rows, max_seq_len) if pack else rows
    packed = bool(rows) and isinstance(rows[0], dict) and "position_ids" in rows[0]
    if packed and opts.get("join", True) and joins_rows(model.config._attn_implementation, max_seq_len):
        return D.collate_joined(rows, pad_id, opts.get("join_multiple", D.JOIN_MULTIPLE))
    return D.collate(rows, pad_id)


def by_sequence(batch: dict, model) -> list[int] | None:
    """The lengths of the sequences that loraforge's lean attention runs one by one in this batch (packed rows of
    sequences up to fastpath.LEAN_MAX_LENGTH), as lean_attention_forward decides; None where it runs whole rows
    (lean_masked, bench/train.py's lf-noseg, or another attention). lean_keep (lf-keepprobs) runs them one by one."""
    if model.config._attn_implementation not in LEAN_BY_SEQUENCE or "position_ids" not in batch:
        return None
    starts = K.segment_starts(batch["position_ids"])
    if not runs_by_sequence(starts):
        return None
    return [end - start for row in starts for start, end in zip(row, row[1:])]


def frozen_params(c) -> int:
    """The weights of the decoder's linear layers: q, o, k, v, gate, up, down in every layer."""
    h, inter = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    return c.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def row_flops(n: int, model_config, lora_params: int) -> float:
    """The decoder's FLOPs for the first n tokens of a row (no head): linears and causal attention."""
    linears = n * (4 * frozen_params(model_config) + 6 * lora_params)  # frozen: forward + dx; LoRA: forward + dx + dW
    return linears + attention_flops(n, model_config)


def attention_flops(n: int, c) -> float:
    """Causal attention over n positions in every layer: QKᵀ and AV, forward and twice that backward."""
    return 3 * c.num_hidden_layers * 4 * c.hidden_size * n * (n + 1) / 2


def frozen_flops(examples, model_config) -> float:
    """The part of useful_flops that any trainer of these LoRA layers runs as large products: the frozen linears
    (forward + dx) and the head (forward + dx, supervised positions). At the matmul peak, with nothing else taking
    any time, no trainer's step could be faster: the table's ceiling."""
    c = model_config
    return sum(len(ex.input_ids) * 4 * frozen_params(c)
               + targets(ex) * 4 * c.hidden_size * c.vocab_size for ex in examples)


def worker(args) -> dict:
    import torch

    from loraforge.studies.demo import demo_config
    from loraforge.training.report import peak_memory_mb

    trainer, opts = VARIANTS[args.variant]
    if opts.get("allocator") and opts["allocator"] != allocator.loaded():
        raise RuntimeError(f"{args.variant}: {opts['allocator']} is not loaded in the worker (LD_PRELOAD refused?)")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    low = args.dtype != "fp32"  # bf16 or fp16: the frozen base is stored in it (lf), matmuls autocast to it
    overrides = [f"training.batch_size={args.micro_batch}", "training.weight_decay=0", "training.max_grad_norm=1.0",
                 f"data.max_seq_len={args.text_len if args.shape == 'text' else args.pack_len}",
                 f"data.packing={str(opts.get('packing', 'auto')).lower()}",
                 f"training.fused_lora={str(opts.get('fused', True)).lower()}",
                 f"training.fused_blocks={str(opts.get('blocks', True)).lower()}",
                 f"training.activation_buffer={str(opts.get('buffer', 'auto')).lower()}",
                 f"training.reuse_memory={str(opts.get('reuse', 'auto')).lower()}",
                 f"training.attention={opts.get('attention', 'auto')}",
                 f"model.dtype={args.dtype if low and not opts.get('fp32_base') else 'fp32'}",
                 f"training.precision={args.dtype}",
                 f"training.gradient_checkpointing={str(opts.get('checkpointing', False)).lower()}",
                 "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0", "lora.target_modules=all-linear"]
    cfg = demo_config("runs/bench-train", overrides=overrides + [f"model.name={args.model}"])

    if trainer == "peft":
        from peft import LoraConfig, get_peft_model

        from loraforge.models import load_base

        model, tok = load_base(args.model, dtype="fp32", device=device)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    else:
        from loraforge.training.loop import build_model

        model, tok = build_model(cfg, device)
        if not opts.get("by_sequence", True) and model.config._attn_implementation == "lean":
            from loraforge.training.fastpath import LEAN_MASKED_ATTENTION

            model.set_attn_implementation(LEAN_MASKED_ATTENTION)
        if opts.get("keep_probs") and model.config._attn_implementation == "lean":
            from loraforge.training.fastpath import LEAN_KEEP_ATTENTION

            model.set_attn_implementation(LEAN_KEEP_ATTENTION)
        if opts.get("query_blocks") is False and model.config._attn_implementation == "lean":
            model.set_attn_implementation(LEAN_WHOLE_ATTENTION)
        free_parts.apply(opts.get("free", ()))  # lf-free-*: timing only, this process's kernels patched
    same_lora_init(model)
    model.train()
    load_peak, rss_loaded = rss_peak_and_now_mb()  # the resident set's peak so far and now, any device
    window = device.type == "cpu" and reset_peak_rss()  # from here on: training's own peak (loading excluded)
    steps = args.warmup + args.steps
    plan = data_shapes.plan(args.shape, tok, steps, args.batch, args.micro_batch, args.text_rows, args.text_len,
                            args.pack_len, args.text_docs)
    examples = [e for step in plan for _, ex in step for e in ex]  # for the packing rule (demo, chat)
    params = [p for p in model.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)  # HF Trainer's default
    pad_id = tok.pad_token_id
    autocast = precision_autocast(args.dtype, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")  # fp16: loss scaling, as train() does

    if trainer == "lf":
        from loraforge.training.loss import HEAD_CHUNK, CausalLMLoss, shares_prefix
        share = opts.get("share_prefix", shares_prefix(cfg.training.share_prefix, device))
        rows = opts.get("head_chunk", HEAD_CHUNK)  # lf-head1024: the previous chunk
        loss_fn = CausalLMLoss(model, chunk_size=rows, fused_head=not opts.get("plain_head"), share_prefix=share)
        if opts.get("fresh_head"):
            loss_fn.head_buffers = None  # every call allocates its own
        if opts.get("full_head"):
            loss_fn = _FullHead(model)
        prefix_of = None if opts.get("compile") else lambda chunk: loss_fn.prefix_to_share(D.collate(chunk, pad_id))
        pack = D.should_pack(cfg.data.packing, D.padding_fraction(examples, args.micro_batch, prefix_of))  # as train()
        pack = pack and args.shape != "text"  # text rows come packed
        if opts.get("compile"):
            loss_fn = torch.compile(loss_fn, dynamic=True)

    held = contextlib.ExitStack()  # kept until the worker returns: a context manager collected early would exit
    buffer = cfg.training.activation_buffer if trainer == "lf" else False
    packed = args.shape == "text" or (trainer == "lf" and pack)  # PEFT's rows are padded, the text shape packed
    setting = opts.get("reuse", cfg.training.reuse_memory if trainer == "lf" else False)
    slab = hold_memory(held, model, setting, buffer, device, packed, compiled=opts.get("compile", False))  # as train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses, real_tokens, flops, executed, floor, seconds, sys_seconds = [], 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for step in range(steps):
        micro = plan[step]
        sync()
        sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime  # kernel time: page faults of fresh allocations
        t0 = time.perf_counter()
        # shapes: (rows, width, shared prefix, rows through the head, sequences attended one by one) per micro-batch
        step_loss, shapes = 0.0, []
        if trainer == "peft":  # the usual loop: mean loss per micro-batch, divided by the accumulation
            for rows, _ in micro:
                batch = {k: v.to(device) for k, v in D.collate(rows, pad_id).items()}
                shapes.append((*batch["input_ids"].shape, 0, batch["input_ids"].numel(), None))  # logits everywhere
                with autocast:
                    loss = model(**batch, use_cache=False).loss / len(micro)
                scaler.scale(loss).backward()
                step_loss += loss.item()
        else:  # loraforge: summed token losses over the step's supervised-token count
            batches = [{k: v.to(device) for k, v in lf_batch(rows, pack, cfg.data.max_seq_len, model, opts,
                                                             pad_id).items()} for rows, _ in micro]
            n_step = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            for batch in batches:
                with autocast, (slab.saving() if slab else contextlib.nullcontext()):
                    loss_sum, _ = loss_fn(batch)
                scaler.scale(loss_sum / n_step).backward()
                step_loss += loss_sum.item() / n_step
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        losses.append(step_loss)
        if step >= args.warmup:
            chosen = [e for _, ex in micro for e in ex]
            seconds += dt
            sys_seconds += resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0
            real_tokens += sum(len(e.input_ids) for e in chosen)
            flops += useful_flops(chosen, model.config, lora_params)  # every trainable parameter is LoRA's
            floor += frozen_flops(chosen, model.config)
            if trainer == "lf":
                shapes = [(*b["input_ids"].shape, loss_fn.prefix_to_share(b),
                           b["labels"].numel() if opts.get("full_head") else int((b["labels"][:, 1:] != -100).sum()),
                           by_sequence(b, model)) for b in batches]
            executed += sum(executed_flops(rows, width, prefix, head, model.config, lora_params, sequences)
                            for rows, width, prefix, head, sequences in shapes)
    peak = peak_memory_mb(device)  # max allocated on CUDA, peak RSS on CPU (since the window opened)
    if device.type == "cpu":  # the process's peak: loading's, where it is higher than training's
        peak = max(peak, load_peak)
    train_peak = window_peak_rss_mb() if window else None
    held.close()
    return {"variant": args.variant, "dtype": args.dtype, "tokens_per_s": real_tokens / seconds,
            "train_peak_mb": train_peak,
            "flops_per_s": flops / seconds, "executed_flops_per_s": executed / seconds,
            "frozen_flops_per_s": floor / seconds, "peak_mb": peak,
            "rss_after_load_mb": rss_loaded, "rss_peak_loading_mb": load_peak, "allocator": allocator.loaded(),
            "losses": losses, "final_loss": losses[-1], "seconds": seconds, "sys_seconds": sys_seconds}


class _FullHead:
    """Ablation: the full-vocabulary logits on every position, then select (what the head-only loss avoids)."""

    def __init__(self, model):
        self.model = model

    def prefix_to_share(self, batch) -> int:
        return 0  # every row in full

    def __call__(self, batch):
        import torch.nn.functional as F

        labels = batch["labels"]
        out = self.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        keep = labels[:, 1:] != -100
        return F.cross_entropy(out.logits[:, :-1][keep].float(), labels[:, 1:][keep], reduction="sum"), keep.sum()


# ------------------------------------------------------------------------------------------------- the driver

def matmul_peak(dtype: str, device: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Peak FLOP/s of a big square torch.matmul in this dtype (best of repeated runs)."""
    import torch

    dt = TORCH_DTYPES[dtype]
    a = torch.randn(n, n, dtype=dt, device=device)
    b = torch.randn(n, n, dtype=dt, device=device)
    best, end = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def run_worker(variant: str, dtype: str, shape: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--dtype-one", dtype, "--shape-one", shape,
           "--text-rows", str(args.text_rows), "--text-len", str(args.text_len), "--text-docs", str(args.text_docs),
           "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
           "--pack-len", str(args.pack_len), "--device", args.device, "--threads", str(args.threads),
           "--model", args.model]
    env = dict(os.environ)
    opts = VARIANTS[variant][1]
    if opts.get("allocator") == "jemalloc":
        if "malloc_conf" in opts:
            env["MALLOC_CONF"] = opts["malloc_conf"]  # "": jemalloc's defaults
        try:
            env = allocator.preload_env(env)
        except FileNotFoundError as e:
            raise SystemExit(f"{variant}: {e}; or leave the *-jemalloc variants out of --variants") from None
    if opts.get("mmap_threshold"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(opts["mmap_threshold"])  # glibc's fixed threshold
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"bench/train.py: the {variant} worker ({dtype}, {shape} data) failed (exit {proc.returncode}); "
                     f"the end of its output:\n{proc.stderr[-3000:]}")


def check_counts(parser: argparse.ArgumentParser, args, **least: int) -> None:
    """flags.at_least for these counts, and row lengths (--text-len, --pack-len) of data.max_seq_len's least, 8."""
    at_least(parser, args, **least, text_len=8, pack_len=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per trainer and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (same data for every trainer; two: the C "
                   "library's heap has grown to its size by then, so the timed steps measure a long run's)")
    p.add_argument("--batch", type=int, default=16, help="examples per optimizer step (effective batch; the demo's 16)")
    p.add_argument("--micro-batch", type=int, default=None, help="examples per forward (default: --batch)")
    p.add_argument("--pack-len", type=int, default=256, help="loraforge: packed row length (data.max_seq_len)")
    p.add_argument("--shapes", default=",".join(data_shapes.SHAPES),
                   help="comma-separated data shapes (bench/shapes.py): "
                   "demo (a shared 38-token prefix), chat (distinct system prompts), text (articles packed into "
                   "--pack-len rows)")
    p.add_argument("--text-rows", type=int, default=4, help="text shape: packed rows per optimizer step")
    p.add_argument("--text-len", type=int, default=512, help="text shape: tokens per packed row")
    p.add_argument("--text-docs", type=int, default=0, help="text shape: the articles joined and cut into documents "
                   "of this many tokens (0: each article its own document, ~230 tokens)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    p.add_argument("--dtypes", default="auto", help="comma-separated precisions: auto (what loraforge.precision "
                   "picks on --device: fp32 on a CPU without native bf16), fp32, bf16, fp16")
    p.add_argument("--variants", default="peft,lf", help=f"from {','.join(VARIANTS)}; the first is the baseline")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--model", default="smollm2-135m", help="base model (default: the built-in one; bench/synthetic.py "
                   "makes random-weight ones of other shapes)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", help="also write every measurement here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dtype-one", help=argparse.SUPPRESS)
    p.add_argument("--shape-one", help=argparse.SUPPRESS)
    args = p.parse_args()
    check_counts(p, args, steps=1, batch=1, micro_batch=1, rounds=1, text_rows=1, warmup=0, threads=0, text_docs=0)
    if args.text_docs > args.text_len:
        p.error(f"--text-docs {args.text_docs} is longer than a row (--text-len {args.text_len}); choose at most "
                f"{args.text_len}")
    args.micro_batch = args.micro_batch or args.batch
    if args.batch % args.micro_batch:
        p.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    if args.worker:
        args.variant, args.dtype, args.shape = args.worker, args.dtype_one, args.shape_one
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    variants, asked, shape_names = args.variants.split(","), args.dtypes.split(","), args.shapes.split(",")
    for sh in shape_names:
        if sh not in data_shapes.SHAPES:
            p.error(f"--shapes: unknown shape {sh!r}; choose from {', '.join(data_shapes.SHAPES)}")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for d in asked:
        if d not in ("auto", *PRECISIONS):
            p.error(f"--dtypes: unknown precision {d!r}; choose from auto, {', '.join(PRECISIONS)}")
    try:  # a missing folder or file: said here, not after the matmul peak inside the first worker (and converted
        # here, not inside the first worker's measured memory)
        resolve_model(args.model)
    except (FileNotFoundError, ModelFilesError, ModelDownloadError) as e:
        p.error(f"--model: {e}")
    auto = auto_precision(args.device)  # resolved once, for every round and worker
    dtypes = list(dict.fromkeys(auto.compute if d == "auto" else d for d in asked))
    hardware = describe(args.device)
    print(header(hardware), flush=True)
    print(f"--dtypes {args.dtypes}: measuring {', '.join(dtypes)}", flush=True)
    print(f"device {args.device}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds × ({args.warmup} warm-up + {args.steps} timed steps) of batch {args.batch} "
          f"(micro-batch {args.micro_batch}) per trainer", flush=True)
    results: dict[tuple[str, str, str], list[dict]] = {}
    peaks: dict[str, list[float]] = {d: [] for d in dtypes}
    loads = []
    started = time.perf_counter()
    for rnd in range(args.rounds):
        for dtype in dtypes:
            peaks[dtype].append(matmul_peak(dtype, args.device))
            order = variants if rnd % 2 == 0 else variants[::-1]  # alternate who goes first
            for shape, v in [(sh, v) for sh in shape_names for v in order]:
                r = run_worker(v, dtype, shape, args)
                results.setdefault((shape, v, dtype), []).append(r)
                loads.append(os.getloadavg()[0])
                if args.json:  # after every worker: a run cut short (bench/gpu.sh's time limits) keeps its rows
                    write_json(args.json, hardware, asked, dtypes, results, peaks, loads, variants, shape_names,
                               complete=False)
                print(f"  round {rnd + 1} {dtype:4s} {shape:4s} {v:12s} {r['tokens_per_s']:7.0f} tok/s"
                      f"  peak {r['peak_mb']:6.0f} MiB"
                      f"  loss {r['final_loss']:.4f}  kernel time {100 * r['sys_seconds'] / r['seconds']:.0f}%"
                      f"  (load {loads[-1]:.1f})", flush=True)

    mem = "peak max_allocated" if args.device == "cuda" else "peak RSS"
    print(f"\n{args.device}, load average during the run {min(loads):.1f}-{max(loads):.1f}, "
          f"{time.perf_counter() - started:.0f} s; medians of {args.rounds} rounds")
    print(header(hardware))
    columns = f"| data | dtype | trainer | real tok/s | ×{variants[0]} | range over rounds | {mem} MiB | " \
              f"×{variants[0]} | training-only peak RSS MiB | " \
              f"final loss | max Δloss vs {variants[0]} | roofline | matmul use |"
    print(columns)
    print("|" + "---|" * (columns.count("|") - 1))
    table = table_rows(results, peaks, variants, shape_names, dtypes)
    for row in table:
        label = f"{row['dtype']} (auto)" if row["dtype"] == auto.compute and "auto" in asked else row["dtype"]
        per_round = row["speedup_per_round"]
        print(f"| {row['shape']} | {label} | {row['variant']} | {row['tokens_per_s']:.0f} | {row['speedup']:.2f} | "
              f"{min(per_round):.2f}-{max(per_round):.2f} | {row['peak_mb']:.0f} | {row['memory_ratio']:.2f} | "
              f"{row['train_peak_mb']} | {row['final_loss']:.4f} | {row['max_loss_diff']:.4f} | "
              f"{100 * row['roofline']:.0f}% | {100 * row['matmul_use']:.0f}% |")
    for dtype in dtypes:
        print(f"matmul peak {dtype}: {statistics.median(peaks[dtype]) / 1e9:.0f} GFLOP/s "
              f"(2048² torch.matmul, median of rounds)")
    for row in (r for r in table if r["variant"] == variants[0]):
        print(f"ceiling {row['shape']} {row['dtype']}: {row['ceiling_tokens_per_s']:.0f} tok/s = "
              f"{row['ceiling_tokens_per_s'] / row['tokens_per_s']:.2f}× {variants[0]}, where nothing but the frozen "
              f"linears and the head took time, at the matmul peak")
    if args.json:
        write_json(args.json, hardware, asked, dtypes, results, peaks, loads, variants, shape_names, complete=True)


def table_rows(results: dict, peaks: dict, variants: list[str], shape_names: list[str],
               dtypes: list[str]) -> list[dict]:
    """The table's rows: a row per trainer of each (data shape, dtype) block whose every trainer has run (a run cut
    short has blocks still missing some), medians over the rounds each has, against the first variant's."""
    table = []
    for shape, dtype in [(sh, d) for sh in shape_names for d in dtypes]:
        if any((shape, v, dtype) not in results for v in variants) or not peaks[dtype]:
            continue
        peak = statistics.median(peaks[dtype])
        base = results[(shape, variants[0], dtype)]
        b_tps = statistics.median(r["tokens_per_s"] for r in base)
        b_mem = statistics.median(r["peak_mb"] for r in base)
        for v in variants:
            rs = results[(shape, v, dtype)]
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            mem_mb = statistics.median(r["peak_mb"] for r in rs)
            window = [r["train_peak_mb"] for r in rs if r.get("train_peak_mb")]
            train_mb = f"{statistics.median(window):.0f}" if window else "-"
            roof = statistics.median(r["flops_per_s"] for r in rs) / peak
            ceiling = statistics.median(r["tokens_per_s"] * peak / r["frozen_flops_per_s"] for r in rs)
            use = statistics.median(r["executed_flops_per_s"] for r in rs) / peak
            dloss = max(abs(a - b) for a, b in zip(rs[0]["losses"], base[0]["losses"]))
            per_round = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, base)]  # the same round's baseline
            table.append({"shape": shape, "dtype": dtype, "variant": v, "tokens_per_s": tps, "speedup": tps / b_tps,
                          "peak_mb": mem_mb, "memory_ratio": mem_mb / b_mem, "train_peak_mb": train_mb,
                          "final_loss": rs[0]["final_loss"], "max_loss_diff": dloss, "speedup_per_round": per_round,
                          "roofline": roof, "matmul_use": use, "matmul_peak_gflops": peak / 1e9,
                          "ceiling_tokens_per_s": ceiling, "ceiling_speedup": ceiling / b_tps})
    return table


def write_json(path: str, hardware: dict, asked: list[str], dtypes: list[str], results: dict, peaks: dict,
               loads: list[float], variants: list[str], shape_names: list[str], complete: bool) -> None:
    """--json: every measurement so far and the table of the blocks complete so far; `complete` False while the
    run goes on (bench/gpu.sh stops a step at its time limit: the rows measured before it stay)."""
    tmp = Path(f"{path}.tmp")  # renamed into place: a kill while writing leaves the previous file whole
    tmp.write_text(json.dumps({"hardware": hardware, "dtypes_asked": asked, "dtypes": dtypes, "complete": complete,
                               "table": table_rows(results, peaks, variants, shape_names, dtypes),
                               "raw": {f"{sh}/{v}/{d}": r for (sh, v, d), r in results.items()},
                               "matmul_peak": peaks, "load": loads}, indent=1))
    os.replace(tmp, path)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
