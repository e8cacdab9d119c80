#!/usr/bin/env python3
"""Write tiny random-weight Hugging Face checkpoints and the per-token NLLs transformers computes for them.

Each fixture is a folder OUT_DIR/<name>/ holding what `save_pretrained` writes (config.json, safetensors
weights, tokenizer files) plus reference.json: the token ids `AutoTokenizer` gives for the corpus and
nll[i] = -log_softmax(logits[i])[tokens[i + 1]] from one float32 eager-attention forward pass of the model
loaded back from that folder. The Rust harness loads the same folders and must match token by token.

Usage: python scripts/make_hf_fixtures.py OUT_DIR [--corpus tests/fixtures/hf/corpus.txt]

Needs torch, transformers, tokenizers and safetensors; runs on the CPU in a few seconds and is
deterministic (fixed seeds, single-threaded torch).
"""

import argparse
import json
import math
import platform
import shutil
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    FalconConfig,
    FalconForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    MistralConfig,
    MistralForCausalLM,
    MptConfig,
    MptForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf" / "corpus.txt"

# Longer than the corpus in tokens (about 1,150 with the smaller tokenizer), so no model sees a position
# it was not built for.
MAX_POSITIONS = 2048

# Random-weight scales: large enough that the NLLs vary token to token, small enough to stay finite.
LINEAR_STD = 0.15
EMBEDDING_STD = 0.3
BIAS_STD = 0.1

BYTE_LEVEL_VOCAB = 384
SENTENCEPIECE_VOCAB = 400
# Characters seen at least twice in the corpus stay in the SentencePiece-style alphabet; the rarer ones
# (é, ×, tab, ...) fall back to <0xNN> byte tokens, so the fixture exercises byte fallback.
SENTENCEPIECE_ALPHABET = 57

MISTRAL_WINDOW = 48
GEMMA3_WINDOW = 48
CAUSALITY_PREFIX = 200


# ---------------------------------------------------------------- tokenizers


def byte_level_tokenizer(text):
    """GPT-2 style byte-level BPE (as Pythia, Falcon, MPT and Qwen2 use): no BOS added."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BYTE_LEVEL_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token=None,
        add_bos_token=False,
    )


def qwen2_tokenizer(byte_level):
    """The byte-level vocabulary and merges under Qwen2Tokenizer's own pipeline (NFC, Qwen2's split regex).

    transformers 5 forces Qwen2Tokenizer on every qwen2 checkpoint whatever tokenizer_config.json names, and
    that class rebuilds its pre-tokenizer, so a qwen2 fixture must be saved through it for tokenizer.json to
    match what AutoTokenizer runs.
    """
    trained = json.loads(byte_level.backend_tokenizer.to_str())["model"]
    merges = [tuple(merge) for merge in trained["merges"]]
    return Qwen2Tokenizer(vocab=trained["vocab"], merges=merges)


def sentencepiece_style_tokenizer(text):
    """Llama-2 style BPE: `▁` Metaspace, <0x00>..<0xFF> byte fallback, <unk>/<s>/</s>, BOS added.

    The merges are trained here; LlamaTokenizer then builds the backend itself (transformers 5 rebuilds a
    LlamaTokenizer's normalizer, pre-tokenizer and decoder from its class on every load), so the
    tokenizer.json it saves is the pipeline AutoTokenizer runs.
    """
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer_tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=SENTENCEPIECE_VOCAB - len(byte_tokens),
        special_tokens=specials,
        limit_alphabet=SENTENCEPIECE_ALPHABET,
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator([text], trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]

    vocab = {token: index for index, token in enumerate(specials + byte_tokens)}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in trained["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


# ---------------------------------------------------------------- fixture configurations
# Each returns (model class, config, tokenizer kind, dtype on disk, save options, config.json rewrite).


def llama3_gqa():
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        # head_dim 16, theta 1e4: wavelengths 6.3 (< 8, kept), 19.9 (between 8 and 32, smoothed) and
        # 63+ (> 32, divided by 8), so all three llama3 regimes occur.
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    return LlamaForCausalLM, config, "sentencepiece", torch.float32, {}, None


def llama_linear():
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM, config, "byte_level", torch.float16, {"max_shard_size": "100KB"}, legacy_llama_rope


def legacy_llama_rope(config_json):
    """Rewrite rope settings in the transformers-4 layout most Hub checkpoints carry (transformers 5 reads both)."""
    rope = config_json.pop("rope_parameters")
    config_json["rope_theta"] = rope["rope_theta"]
    config_json["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}


def qwen2_bias():
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=0,
        eos_token_id=0,
    )
    return Qwen2ForCausalLM, config, "qwen2", torch.bfloat16, {}, None


def mistral_window():
    config = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        sliding_window=MISTRAL_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return MistralForCausalLM, config, "sentencepiece", torch.float32, {}, None


def pythia():
    config = GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        use_parallel_residual=True,
        tie_word_embeddings=False,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM, config, "byte_level", torch.float32, {}, legacy_neox_rotary


def legacy_neox_rotary(config_json):
    """Rewrite rotary settings as Pythia's Hub config.json spells them (rotary_pct, rotary_emb_base)."""
    rope = config_json.pop("rope_parameters")
    config_json["rotary_pct"] = rope["partial_rotary_factor"]
    config_json["rotary_emb_base"] = rope["rope_theta"]


def falcon_7b():
    config = FalconConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        ffn_hidden_size=96,
        max_position_embeddings=MAX_POSITIONS,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        bias=False,
        alibi=False,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return FalconForCausalLM, config, "byte_level", torch.float32, {}, None


def falcon_40b():
    config = FalconConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128,
        max_position_embeddings=MAX_POSITIONS,
        new_decoder_architecture=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return FalconForCausalLM, config, "byte_level", torch.bfloat16, {}, None


def mpt_alibi():
    config = MptConfig(
        d_model=48,
        n_heads=6,
        n_layers=2,
        expansion_ratio=4,
        max_seq_len=MAX_POSITIONS,
        no_bias=True,
        tie_word_embeddings=True,
        attn_config={"alibi": True, "alibi_bias_max": 8},
    )
    return MptForCausalLM, config, "byte_level", torch.bfloat16, {}, None


def gemma3_local():
    """Gemma 3 text model: local (sliding window) and global layers with their own RoPE bases, q/k norms, four
    norms a block, (1 + w) norm scales, sqrt(hidden) embedding scale, query_pre_attn_scalar, tanh GELU, tied."""
    config = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        # head_dim 24, not hidden / heads = 16; scores scaled by 32**-0.5, not 24**-0.5.
        head_dim=24,
        query_pre_attn_scalar=32,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        sliding_window=GEMMA3_WINDOW,
        # The last layer is local, so "the last layer is global" is not assumed either.
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        # The SentencePiece-style vocabulary: <unk> 0, <s> 1, </s> 2 (Gemma's own is <pad> 0, <eos> 1, <bos> 2).
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Gemma3ForCausalLM, config, "sentencepiece", torch.float32, {}, None


FIXTURES = {
    "llama3-gqa": llama3_gqa,
    "llama-linear": llama_linear,
    "qwen2-bias": qwen2_bias,
    "mistral-window": mistral_window,
    "pythia": pythia,
    "falcon-7b": falcon_7b,
    "falcon-40b": falcon_40b,
    "mpt-alibi": mpt_alibi,
    "gemma3-local": gemma3_local,
}


# ---------------------------------------------------------------- shared helpers


def randomize_parameters(model, seed):
    """Random weights everywhere, norms included (scales around 1, offsets around 0), so norm bugs show."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            module_name, _, kind = name.rpartition(".")
            module = modules[module_name]
            if "Norm" in type(module).__name__:
                if kind == "weight" and type(module).__name__.startswith("Gemma"):
                    # Gemma's RMSNorm multiplies by (1 + weight): the same scales U(0.5, 1.5), stored as scale - 1.
                    values = torch.rand(parameter.shape, generator=generator) - 0.5
                elif kind == "weight":
                    values = 0.5 + torch.rand(parameter.shape, generator=generator)
                else:
                    values = BIAS_STD * torch.randn(parameter.shape, generator=generator)
            elif kind == "bias":
                values = BIAS_STD * torch.randn(parameter.shape, generator=generator)
            elif isinstance(module, torch.nn.Embedding) or module is model.get_output_embeddings():
                values = EMBEDDING_STD * torch.randn(parameter.shape, generator=generator)
            else:
                values = LINEAR_STD * torch.randn(parameter.shape, generator=generator)
            parameter.copy_(values)


def rewrite_json(path, edit):
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer, folder):
    """save_pretrained, then state add_bos_token/add_eos_token in tokenizer_config.json as Hub checkpoints do
    (transformers 5 no longer writes them; the BOS itself comes from tokenizer.json's post-processor)."""
    tokenizer.save_pretrained(folder)

    def state_bos_eos(config):
        config["add_bos_token"] = tokenizer.add_bos_token
        config["add_eos_token"] = tokenizer.add_eos_token

    rewrite_json(folder / "tokenizer_config.json", state_bos_eos)


def tokenize(folder, text):
    """AutoTokenizer's ids, checked against the bare tokenizer.json pipeline the Rust side runs."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text)["input_ids"]
    bare_ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    assert ids == bare_ids, f"{folder.name}: AutoTokenizer and tokenizer.json disagree"
    assert len(ids) <= MAX_POSITIONS, f"{folder.name}: {len(ids)} tokens exceed {MAX_POSITIONS} positions"
    bos_added = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    return ids, bos_added


def load_float32(folder, **config_overrides):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", **config_overrides
    ).eval()


def token_nlls(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:]).unsqueeze(1)
    return -log_probs.gather(1, targets).squeeze(1)


def check_rope_survives_reload(name, written, reloaded):
    """Guards the config.json rewrites: transformers must read back the rope settings the model was built with."""
    written_rope = getattr(written, "rope_parameters", None) or {}
    reloaded_rope = getattr(reloaded, "rope_parameters", None) or {}
    changed = {key for key, value in written_rope.items() if reloaded_rope.get(key) != value}
    assert not changed, f"{name}: rope settings {sorted(changed)} changed on reload"


def check_causal(name, model, ids, nll):
    """A prefix's NLLs must equal the full run's: proves the reference saw no future tokens."""
    prefix_nll = token_nlls(model, ids[:CAUSALITY_PREFIX])
    gap = (prefix_nll - nll[: CAUSALITY_PREFIX - 1]).abs().max().item()
    print(f"  causality: {CAUSALITY_PREFIX}-token prefix NLLs within {gap:.1e} of the full run's")
    # MPT's ALiBi bias is offset by the sequence length (softmax ignores it), so allow rounding, not leakage.
    assert gap < 1e-3, f"{name}: prefix NLLs differ from the full run's by {gap}"


def check_mistral_window(folder, ids, nll):
    """The window must change the NLLs from query position MISTRAL_WINDOW on, and only there."""
    unwindowed = token_nlls(load_float32(folder, sliding_window=None), ids)
    gaps = (unwindowed - nll).abs()
    before = gaps[:MISTRAL_WINDOW].max().item()
    first_changed = int(torch.nonzero(gaps > 1e-5)[0])
    assert before < 1e-5, f"mistral-window: NLLs before position {MISTRAL_WINDOW} changed by {before}"
    assert first_changed == MISTRAL_WINDOW, f"mistral-window: first changed NLL at {first_changed}"
    print(
        f"  sliding window: nll[0..{MISTRAL_WINDOW}) equal without it (max gap {before:.1e}); "
        f"first change at nll[{first_changed}] ({gaps[first_changed].item():.4f}), "
        f"mean gap past it {gaps[MISTRAL_WINDOW:].mean().item():.4f}"
    )


def check_gemma3(folder, written, reloaded, ids, nll):
    """Layer types and window survive the reload, and the window changes the NLLs from position GEMMA3_WINDOW on,
    and only there (a window as long as the positions stands for none: transformers needs one for local layers)."""
    assert reloaded.config.layer_types == written.layer_types, "gemma3-local: layer_types changed on reload"
    assert reloaded.config.sliding_window == GEMMA3_WINDOW, "gemma3-local: sliding_window changed on reload"
    assert reloaded.config.query_pre_attn_scalar == written.query_pre_attn_scalar
    assert reloaded.config.head_dim == written.head_dim
    unwindowed = token_nlls(load_float32(folder, sliding_window=MAX_POSITIONS), ids)
    gaps = (unwindowed - nll).abs()
    before = gaps[:GEMMA3_WINDOW].max().item()
    first_changed = int(torch.nonzero(gaps > 1e-5)[0])
    assert before < 1e-5, f"gemma3-local: NLLs before position {GEMMA3_WINDOW} changed by {before}"
    assert first_changed == GEMMA3_WINDOW, f"gemma3-local: first changed NLL at {first_changed}"
    print(
        f"  sliding window: nll[0..{GEMMA3_WINDOW}) equal without it (max gap {before:.1e}); "
        f"first change at nll[{first_changed}] ({gaps[first_changed].item():.4f}), "
        f"mean gap past it {gaps[GEMMA3_WINDOW:].mean().item():.4f}"
    )


def package_versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def write_fixture(out_dir, name, seed, text, tokenizer_by_kind):
    model_class, config, tokenizer_kind, disk_dtype, save_options, config_rewrite = FIXTURES[name]()
    folder = out_dir / name
    if folder.exists():
        shutil.rmtree(folder)

    config.initializer_range = LINEAR_STD
    config.vocab_size = len(tokenizer_by_kind[tokenizer_kind])
    model = model_class(config)
    randomize_parameters(model, seed)
    model.to(disk_dtype).save_pretrained(folder, **save_options)
    save_tokenizer(tokenizer_by_kind[tokenizer_kind], folder)
    if config_rewrite is not None:
        rewrite_json(folder / "config.json", config_rewrite)

    ids, bos_added = tokenize(folder, text)
    reloaded = load_float32(folder)
    check_rope_survives_reload(name, model.config, reloaded.config)
    nll = token_nlls(reloaded, ids)
    check_causal(name, reloaded, ids, nll)
    if name == "mistral-window":
        check_mistral_window(folder, ids, nll)
    if name == "gemma3-local":
        check_gemma3(folder, model.config, reloaded, ids, nll)

    reference = {
        "model_type": reloaded.config.model_type,
        "tokens": ids,
        "nll": nll.tolist(),
        "bos_added": bos_added,
        "versions": package_versions(),
        "dtype_on_disk": str(disk_dtype).removeprefix("torch."),
    }
    (folder / "reference.json").write_text(json.dumps(reference) + "\n", encoding="utf-8")

    size = sum(path.stat().st_size for path in folder.iterdir())
    mean = nll.mean().item()
    print(
        f"{name}: {len(ids)} tokens, mean NLL {mean:.4f} (ln V = {math.log(config.vocab_size):.4f}), "
        f"NLL std {nll.std().item():.4f}, {size} bytes: "
        + ", ".join(f"{p.name}={p.stat().st_size}" for p in sorted(folder.iterdir()))
    )
    assert nll.std().item() > 0.5, f"{name}: NLLs barely vary; raise the weight scales"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURES), help="fixtures to write (default: all)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    text = args.corpus.read_bytes().decode("utf-8")
    byte_level = byte_level_tokenizer(text)
    tokenizer_by_kind = {
        "byte_level": byte_level,
        "qwen2": qwen2_tokenizer(byte_level),
        "sentencepiece": sentencepiece_style_tokenizer(text),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(FIXTURES):
        if args.only is None or name in args.only:
            write_fixture(args.out_dir, name, 1000 + seed, text, tokenizer_by_kind)
    print("versions:", json.dumps(package_versions()))


if __name__ == "__main__":
    main()
