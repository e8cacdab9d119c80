#!/usr/bin/env python3
"""The torch side of scripts/bench-gpu.sh: the machine's software, the random 7B checkpoint and
the transformers reference figures on it. Needs torch with CUDA and transformers (5.x);
writes JSON.

  env --out F                  torch/transformers/CUDA versions and which SDPA back ends are on
  write-smol DIR               a SmolLM2-135M-shaped checkpoint, random weights, f32 safetensors
                               (the tokenizer.json is the caller's, as for write-7b)
  write-7b DIR                 a Llama-2-7B-shaped checkpoint, random weights, bf16 safetensors,
                               SmolLM2's vocabulary (49,152); the tokenizer.json is streamppl's
                               to write (`streamppl info SMOLLM2 --save-tokenizer DIR/tokenizer.json`)
  reference DIR --out F        on that checkpoint: the reference-style token loop (one token per
                               forward pass, 4 sinks + 1020 recent kept) and one dense forward pass

Token ids are random in [0, vocab) (seed 0): streamppl's tokenizer is not available to python,
and for speed the ids do not matter.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

VOCAB = 49152  # SmolLM2's vocabulary, so its tokenizer serves the random checkpoint
SINKS, RECENT = 4, 1020  # the StreamingLLM paper's start_size and recent_size
DEVICE = "cuda"  # the GPU measured (streamppl's `--device cuda` is device 0 too)


def llama_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        # Small weights keep 32 random layers' activations finite in bf16.
        initializer_range=0.02,
    )


def build_on_gpu(config):
    """The model with random weights (seed 0), made directly on the GPU in bf16: initializing
    6.7 B parameters on the CPU in f32 would take minutes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    if any(p.dtype != torch.bfloat16 for p in model.parameters()):
        model.to(torch.bfloat16)  # a transformers that builds in its own dtype
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        model.set_attn_implementation("sdpa")
    return model.eval()


def cmd_env(args):
    import numpy
    import safetensors
    import transformers

    sdpa = torch.backends.cuda
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "sdpa_backends_enabled": {
            "cudnn": sdpa.cudnn_sdp_enabled(),
            "flash": sdpa.flash_sdp_enabled(),
            "mem_efficient": sdpa.mem_efficient_sdp_enabled(),
            "math": sdpa.math_sdp_enabled(),
        },
    }
    write_json(info, args.out)


def cmd_write_7b(args):
    started = time.perf_counter()
    model = build_on_gpu(llama_7b_config())
    check_finite(model)
    built = time.perf_counter()
    # Saved from the CPU, the path scripts/check-gpu.sh has shown to work with this transformers.
    model.to("cpu")
    model.save_pretrained(args.dir, safe_serialization=True)
    if not list(Path(args.dir).glob("*.safetensors")):
        sys.exit(f"{args.dir}: save_pretrained wrote no .safetensors file")
    # SmolLM2 puts no BOS before a text; neither does this checkpoint's tokenizer.
    (Path(args.dir) / "tokenizer_config.json").write_text('{"add_bos_token": false}\n')
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.dir}: {parameters / 1e9:.2f} B parameters, built on the GPU in "
        f"{built - started:.1f} s, saved in {time.perf_counter() - built:.1f} s"
    )


def cmd_write_smol(args):
    """A SmolLM2-135M-shaped checkpoint with random weights (seed 0), f32 safetensors; the
    tokenizer.json is the caller's to copy in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        initializer_range=0.05,
    )
    LlamaForCausalLM(config).save_pretrained(args.dir, safe_serialization=True)
    (Path(args.dir) / "tokenizer_config.json").write_text('{"add_bos_token": false}\n')
    print(f"{args.dir}: SmolLM2-135M shape, random weights")


@torch.inference_mode()
def check_finite(model):
    """Random weights too large for 32 layers would give inf/NaN logits: fail before saving."""
    ids = torch.arange(64, device=DEVICE)[None]
    if not torch.isfinite(model(input_ids=ids, use_cache=False).logits).all():
        sys.exit("the random checkpoint gives non-finite logits; lower initializer_range")


def load_checkpoint(folder):
    """The checkpoint's own weights (strictly every tensor) in the model built on the GPU."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    model = build_on_gpu(LlamaConfig.from_pretrained(folder))
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f, device=DEVICE))
    model.load_state_dict(state, strict=True)
    return model


def kv_layers(cache):
    """Each layer's cache, with `.keys`/`.values` of shape [batch, heads, seq, head_dim]
    (transformers 5's DynamicCache); any other layout stops here rather than evicting wrong."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        import transformers

        sys.exit(
            f"{type(cache).__name__} of transformers {transformers.__version__} has no "
            ".layers[i].keys/.values: the 4+1020 eviction needs updating"
        )
    return layers


def evict(cache):
    """The paper's StartRecentKVCache: past 4 + 1020 entries, keep the first 4 and the last 1020
    (a new tensor per layer, as its torch.cat does)."""
    for layer in kv_layers(cache):
        n = layer.keys.shape[-2]
        if n <= SINKS + RECENT:
            return  # every layer holds as many entries
        for name in ("keys", "values"):
            t = getattr(layer, name)
            setattr(layer, name, torch.cat([t[..., :SINKS, :], t[..., n - RECENT :, :]], dim=-2))


@torch.inference_mode()
def token_loop(model, ids, warmup, steps):
    """The StreamingLLM paper's evaluation loop (eval_long_ppl.py), reference-style: one token per
    forward pass with the cache, its NLL read back every step, then eviction to 4 + 1020.
    Positions follow the cache index (what slicing a DynamicCache gives); for speed that does not
    matter. Starts from a full cache (one 1024-token pass) so every timed step attends to 1024
    keys and evicts."""
    prefill = SINKS + RECENT
    out = model(input_ids=ids[:, :prefill].to(DEVICE), use_cache=True)
    cache = out.past_key_values
    seen = kv_layers(cache)[0].keys.shape[-2]
    if seen != prefill:
        sys.exit(f"cache holds {seen} entries after a {prefill}-token pass: not [b, h, seq, d]?")
    nlls = []
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        i = prefill + step
        out = model(input_ids=ids[:, i : i + 1].to(DEVICE), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        label = ids[0, i + 1].to(DEVICE)
        nll = -torch.log_softmax(out.logits[0, -1].float(), dim=-1)[label]
        nlls.append(nll.item())
        evict(cache)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    cached = kv_layers(cache)[0].keys.shape[-2]
    if cached != prefill or cache.get_seq_length() != prefill:
        sys.exit(f"the cache holds {cached} entries after eviction, not {prefill}: slicing had no effect")
    return {
        "name": "transformers token loop (reference-style)",
        "cache": f"{SINKS}+{RECENT}",
        "cache_entries_after": cached,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "seconds": seconds,
        "tokens_per_second": steps / seconds,
        "ms_per_token": 1000 * seconds / steps,
        "mean_nll": statistics.fmean(nlls[warmup:]),
    }


@torch.inference_mode()
def dense_forward(model, ids, tokens, repeats):
    """One forward pass over `tokens` tokens (no cache) and their next-token NLLs: the median of
    `repeats` timed passes after one warm-up pass."""
    x = ids[:, :tokens].to(DEVICE)

    def once():
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, x[0, 1:])

    once()
    times, nll = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        nll = once().item()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {
        "name": "transformers dense forward",
        "tokens": tokens,
        "timed_passes": repeats,
        "seconds": seconds,
        "seconds_all": times,
        "tokens_per_second": tokens / seconds,
        "mean_nll": nll,
    }


def cmd_reference(args):
    started = time.perf_counter()
    model = load_checkpoint(args.dir)
    loaded = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    need = max(SINKS + RECENT + args.warmup + args.steps + 1, max(args.dense))
    ids = torch.randint(0, model.config.vocab_size, (1, need), generator=generator)
    result = {
        "checkpoint": str(args.dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "bf16",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "token_ids": "random in [0, vocab), seed 0",
        "load_seconds": loaded,
        "token_loop": token_loop(model, ids, args.warmup, args.steps),
        "dense_forward": [],
    }
    for tokens in args.dense:
        torch.cuda.empty_cache()
        try:
            result["dense_forward"].append(dense_forward(model, ids, tokens, args.repeats))
        except (RuntimeError, ValueError, IndexError) as e:  # OOM or a length the model refuses
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            result["dense_forward"].append({"tokens": tokens, "error": first[:300]})
    result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    write_json(result, args.out)


def write_json(value, path):
    text = json.dumps(value, indent=2) + "\n"
    Path(path).write_text(text)
    print(text, end="")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="software versions and SDPA back ends")
    env.add_argument("--out", type=Path, required=True)
    env.set_defaults(run=cmd_env)
    w = sub.add_parser("write-7b", help="write the random Llama-2-7B-shaped checkpoint")
    w.add_argument("dir", type=Path)
    w.set_defaults(run=cmd_write_7b)
    ws = sub.add_parser("write-smol", help="write a random SmolLM2-135M-shaped checkpoint")
    ws.add_argument("dir", type=Path)
    ws.set_defaults(run=cmd_write_smol)
    r = sub.add_parser("reference", help="transformers figures on a checkpoint")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--warmup", type=int, default=20, help="untimed token-loop steps")
    r.add_argument("--steps", type=int, default=300, help="timed token-loop steps")
    r.add_argument("--dense", type=int, nargs="+", default=[4096, 8192], help="dense pass lengths")
    r.add_argument("--repeats", type=int, default=3, help="timed dense passes (median)")
    r.set_defaults(run=cmd_reference)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
