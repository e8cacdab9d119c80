#!/usr/bin/env python3
"""Independent reference for the real Gemma 3 270M GGUF: per-book token ids of the corpus and the dense NLLs of
the first 2048 tokens of book 0, computed with SentencePiece, transformers and torch (float32, CPU), no Rust.

Usage: python scripts/gemma3_reference.py [--gguf models/gemma-3-270m-q4_k_m.gguf]
           [--corpus datasets/gutenberg-mini/test.parquet] [--out tests/fixtures/gemma3-270m/reference.json]

Needs torch, transformers (5.17), accelerate, gguf, sentencepiece, tokenizers, numpy, pyarrow. Takes about
7.5 to 8 minutes on 2 CPU cores (CPU only, peak memory 8.6 GB).

Tokenizer. transformers 5.17 does read Gemma 3 GGUF tokenizers (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`), but what it builds is not Gemma's tokenizer: its GGUFGemmaConverter makes a *Unigram* model
whose piece scores are the GGUF scores, and Gemma's scores are BPE merge ranks (score = -rank), so Viterbi
prefers short pieces ("Hello world" -> Hello / ▁w / or / ld instead of Hello / ▁world); it also adds no BOS
although the GGUF says add_bos_token. Its ids are recorded here for the record only. The reference ids come from
Google's SentencePiece library running a ModelProto rebuilt from the GGUF vocabulary (pieces, scores, types,
BPE, byte fallback, identity normalizer, no dummy prefix, as tokenizer.ggml.add_space_prefix = false says),
undoing what llama.cpp's converter did to it: user-defined pieces had their `▁` turned into spaces ("pre-normalize
user-defined spaces") and <unk> was marked CONTROL. BOS (id 2) is prepended once per book. The script compares
these ids with transformers' GemmaTokenizer converted from that model (BPE with merges, as the Hub's tokenizer.json
for Gemma is made) and with the bare tokenizer.json it saves run by the `tokenizers` library: those two agree with
each other, and with SentencePiece except on runs of 32 or more spaces (SentencePiece takes the 31-space piece
first, as llama.cpp does; transformers' added-token matcher takes 16-space pieces).

Model. `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)`, eager attention:
transformers dequantizes every tensor with the gguf package and subtracts 1 from every `*norm.weight` (llama.cpp's
converter adds 1 to Gemma 3 norm weights, (1 + w) being folded in). The script checks each loaded tensor against
its own gguf dequantization, and the loaded config against the architecture facts.
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import sentencepiece
import tokenizers
import torch
import transformers
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from transformers import AutoModelForCausalLM, AutoTokenizer

import gguf
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
DEFAULT_CORPUS = ROOT / "datasets" / "gutenberg-mini" / "test.parquet"
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "gemma3-270m" / "reference.json"

BOS_ID = 2
DENSE_TOKENS = 2048

# What the architecture is (from the model card / Hub config.json of google/gemma-3-270m).
EXPECTED = {
    "num_hidden_layers": 18,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 512,
    "query_pre_attn_scalar": 256,
    "vocab_size": 262144,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "layer_types": [
        "full_attention" if layer in (5, 11, 17) else "sliding_attention" for layer in range(18)
    ],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}

# llama.cpp token types (gguf.TokenType) -> SentencePiece piece types.
SP_TYPES = {
    gguf.TokenType.NORMAL: sp_pb.ModelProto.SentencePiece.NORMAL,
    gguf.TokenType.UNKNOWN: sp_pb.ModelProto.SentencePiece.UNKNOWN,
    gguf.TokenType.CONTROL: sp_pb.ModelProto.SentencePiece.CONTROL,
    gguf.TokenType.USER_DEFINED: sp_pb.ModelProto.SentencePiece.USER_DEFINED,
    gguf.TokenType.UNUSED: sp_pb.ModelProto.SentencePiece.UNUSED,
    gguf.TokenType.BYTE: sp_pb.ModelProto.SentencePiece.BYTE,
}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ids_sha256(ids):
    return hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest()


def field(reader, key):
    value = reader.fields[key].contents()
    return value


# ---------------------------------------------------------------- tokenizers


def sentencepiece_model(reader, folder):
    """Rebuild Gemma's SentencePiece BPE model from the GGUF vocabulary; returns the .model path."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id")
    assert field(reader, "tokenizer.ggml.model") == "llama", "expected a SentencePiece (llama) vocabulary"
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False

    model = sp_pb.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = sp_pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.unk_id = unk_id
    trainer.bos_id = field(reader, "tokenizer.ggml.bos_token_id")
    trainer.eos_id = field(reader, "tokenizer.ggml.eos_token_id")
    trainer.pad_id = field(reader, "tokenizer.ggml.padding_token_id")
    trainer.unk_piece, trainer.bos_piece = tokens[trainer.unk_id], tokens[trainer.bos_id]
    trainer.eos_piece, trainer.pad_piece = tokens[trainer.eos_id], tokens[trainer.pad_id]
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True

    restored_spaces = 0
    for index, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        piece = model.pieces.add()
        kind = gguf.TokenType(kind)
        if kind == gguf.TokenType.USER_DEFINED and " " in token:
            # llama.cpp matches user-defined tokens on raw text, so its converter wrote "▁▁" as "  ".
            token = token.replace(" ", "\u2581")
            restored_spaces += 1
        piece.piece = token
        piece.score = score
        piece.type = SP_TYPES[kind]
        if index == unk_id:
            piece.type = sp_pb.ModelProto.SentencePiece.UNKNOWN  # llama.cpp's converter made it CONTROL
    path = folder / "tokenizer.model"
    path.write_bytes(model.SerializeToString())
    counts = {}
    for kind in types:
        name = gguf.TokenType(kind).name
        counts[name] = counts.get(name, 0) + 1
    return path, {"token_types": counts, "user_defined_spaces_restored": restored_spaces}


def first_difference(a, b):
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def roundtrip_note(text, decoded):
    if decoded == text:
        return None
    at = first_difference(text, decoded)
    return {
        "first_difference_at_char": at,
        "text": text[max(0, at - 20) : at + 20],
        "decoded": decoded[max(0, at - 20) : at + 20],
        "text_chars": len(text),
        "decoded_chars": len(decoded),
    }


def tokenizer_report(books, ids_per_book, decode, reference=None):
    """Per-book counts and hashes of one tokenizer's ids, with round-trip and agreement notes."""
    rows, everything = [], []
    for index, (book, ids) in enumerate(zip(books, ids_per_book)):
        row = {"index": index, "title": book["title"], "tokens": len(ids), "sha256": ids_sha256(ids)}
        note = roundtrip_note(book["text"], decode(ids))
        if note is not None:
            row["roundtrip"] = note
        if reference is not None and ids != reference[index]:
            at = first_difference(ids, reference[index])
            row["differs_from_reference_at"] = at
            row["here"] = ids[at : at + 8]
            row["reference"] = reference[index][at : at + 8]
        rows.append(row)
        everything.extend(ids)
    return rows, {"tokens": len(everything), "sha256": ids_sha256(everything)}


def piece_bytes(processor):
    """Bytes of text each id stands for (byte pieces 1, others their UTF-8 with U+2581 as a space)."""
    lengths = []
    for index in range(processor.get_piece_size()):
        if processor.is_byte(index):
            lengths.append(1)
        elif processor.is_control(index):
            lengths.append(0)
        else:
            lengths.append(len(processor.id_to_piece(index).replace("\u2581", " ").encode("utf-8")))
    return np.asarray(lengths, dtype=np.int64)


def differing_spans(reference, other, lengths, decode):
    """Where two tokenizations (same vocabulary) of one text part: the stretches between the byte offsets where
    both put a token boundary, whose ids differ, with the text there and how many pieces each side used."""
    ends_a = np.cumsum(lengths[np.asarray(reference)])
    ends_b = np.cumsum(lengths[np.asarray(other)])
    common = np.intersect1d(ends_a, ends_b)
    spans, start_a, start_b = [], 0, 0
    for offset in common:
        stop_a = int(np.searchsorted(ends_a, offset, side="right"))
        stop_b = int(np.searchsorted(ends_b, offset, side="right"))
        if reference[start_a:stop_a] != other[start_b:stop_b]:
            spans.append(
                {
                    "text": decode(reference[start_a:stop_a]),
                    "reference_pieces": stop_a - start_a,
                    "other_pieces": stop_b - start_b,
                }
            )
        start_a, start_b = stop_a, stop_b
    return spans


def summarize_spans(spans):
    runs = [len(span["text"]) - len(span["text"].lstrip(" ")) for span in spans]
    return {
        "differing_spans": len(spans),
        "spans_starting_with_32_or_more_spaces": sum(1 for run in runs if run >= 32),
        "leading_space_runs": sorted(set(runs)),
        "reference_pieces": sum(span["reference_pieces"] for span in spans),
        "other_pieces": sum(span["other_pieces"] for span in spans),
        "examples": spans[:3] + [span for span, run in zip(spans, runs) if run < 32][:10],
    }


# ---------------------------------------------------------------- model


def check_config(config):
    found = {key: getattr(config, key, None) for key in EXPECTED}
    wrong = {key: found[key] for key in EXPECTED if found[key] != EXPECTED[key]}
    return found, wrong


# llama.cpp's Gemma 3 tensor names -> transformers' Gemma3ForCausalLM parameters (written out here rather than
# taken from transformers, so that the check below also checks transformers' name mapping).
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def hf_name(gguf_name):
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{GGUF_TO_HF[part]}.{suffix}"
    return f"{GGUF_TO_HF[stem]}.{suffix}"


def check_weights(model, reader):
    """Every loaded tensor equals the gguf package's own dequantization of its GGUF tensor (norms: minus 1)."""
    state = model.state_dict()
    mapping, quant_types, worst = {}, {}, 0.0
    for tensor in reader.tensors:
        target = hf_name(tensor.name)
        values = torch.from_numpy(np.array(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        values = values.reshape(state[target].shape)
        if tensor.name.endswith("norm.weight"):
            values = values - 1
        worst = max(worst, (values - state[target]).abs().max().item())
        mapping[tensor.name] = target
        quant_types[tensor.tensor_type.name] = quant_types.get(tensor.tensor_type.name, 0) + 1
    assert worst == 0.0, f"loaded weights differ from the GGUF dequantization by {worst}"
    assert len(mapping) == len(state) - 1, "a parameter was not in the GGUF"  # lm_head.weight is tied
    assert "output.weight" not in mapping and model.lm_head.weight is model.model.embed_tokens.weight
    norm_raw = {}
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.0.") and tensor.name.endswith("norm.weight"):
            raw = np.array(tensor.data, dtype=np.float32)
            norm_raw[tensor.name] = {"min": float(raw.min()), "median": float(np.median(raw)), "max": float(raw.max())}
    return mapping, quant_types, norm_raw


def dense_nlls(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:]).unsqueeze(1)
    return (-log_probs.gather(1, targets).squeeze(1)).double()


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    started = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    folder, name = str(args.gguf.parent), args.gguf.name

    log(f"sha256 of {args.gguf}")
    gguf_sha = sha256_file(args.gguf)
    reader = GGUFReader(args.gguf)
    arch = field(reader, "general.architecture")
    metadata = {
        key: field(reader, key)
        for key in reader.fields
        if key.startswith(f"{arch}.") or (key.startswith("tokenizer.ggml.") and key.split(".")[-1] not in ("tokens", "scores", "token_type"))
    }

    table = pq.read_table(args.corpus)
    books = [{"title": title, "text": text} for title, text in zip(table["short_book_title"].to_pylist(), table["text"].to_pylist())]
    log(f"{len(books)} books, {sum(len(b['text']) for b in books)} characters")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)

        # -- the reference: SentencePiece on the rebuilt model
        sp_folder = scratch / "sentencepiece"
        sp_folder.mkdir()
        sp_path, sp_info = sentencepiece_model(reader, sp_folder)
        processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
        assert processor.bos_id() == BOS_ID and processor.id_to_piece(BOS_ID) == "<bos>"
        log("tokenizing with SentencePiece")
        reference = [[BOS_ID] + processor.encode(book["text"]) for book in books]
        assert all(ids.count(BOS_ID) == 1 for ids in reference), "a book's text tokenized to <bos>"
        ref_rows, ref_total = tokenizer_report(books, reference, lambda ids: processor.decode(ids[1:]))

        # -- transformers' GemmaTokenizer converted from the same model, and its bare tokenizer.json
        (sp_folder / "tokenizer_config.json").write_text(
            json.dumps(
                {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                 "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False}
            )
        )
        log("tokenizing with transformers' GemmaTokenizer converted from that model")
        converted = AutoTokenizer.from_pretrained(sp_folder)
        converted_ids = [converted(book["text"])["input_ids"] for book in books]
        converted.save_pretrained(scratch / "converted")
        bare = tokenizers.Tokenizer.from_file(str(scratch / "converted" / "tokenizer.json"))
        bare_ids = [bare.encode(book["text"]).ids for book in books]
        converted_rows, converted_total = tokenizer_report(
            books, converted_ids, lambda ids: converted.decode(ids, skip_special_tokens=True), reference
        )
        lengths, converted_spans = piece_bytes(processor), []
        for index, ids in enumerate(converted_ids):
            if ids != reference[index]:
                converted_spans += differing_spans(reference[index], ids, lengths, processor.decode)

        # -- what transformers builds from the GGUF (for the record)
        log("loading transformers' tokenizer from the GGUF (slow: parses 262,144 tokens in Python)")
        from_gguf = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        log("tokenizing with it")
        gguf_ids = [from_gguf(book["text"])["input_ids"] for book in books]
        from_gguf.save_pretrained(scratch / "from_gguf")
        gguf_bare = tokenizers.Tokenizer.from_file(str(scratch / "from_gguf" / "tokenizer.json"))
        gguf_bare_ids = [gguf_bare.encode(book["text"]).ids for book in books]
        gguf_rows, gguf_total = tokenizer_report(
            books, gguf_ids, lambda ids: from_gguf.decode(ids, skip_special_tokens=True), reference
        )
        gguf_backend = json.loads(from_gguf.backend_tokenizer.to_str())
        hello = {
            "text": "Hello world",
            "reference": [BOS_ID] + processor.encode("Hello world"),
            "transformers_gguf": from_gguf("Hello world")["input_ids"],
            "transformers_gguf_pieces": from_gguf.convert_ids_to_tokens(from_gguf("Hello world")["input_ids"]),
        }

    tokenizer_record = {
        "reference": "sentencepiece",
        "sentencepiece": {
            "how": "SentencePieceProcessor on a ModelProto rebuilt from the GGUF's tokenizer.ggml.tokens/scores/"
            "token_type: BPE, byte_fallback, normalizer identity, add_dummy_prefix false, "
            "remove_extra_whitespaces false; user-defined pieces' spaces turned back into U+2581, <unk> typed "
            "UNKNOWN; ids = [2] + encode(text)",
            **sp_info,
            "roundtrip_all_books": all("roundtrip" not in row for row in ref_rows),
        },
        "transformers_from_sentencepiece_model": {
            "how": "AutoTokenizer (GemmaTokenizer, BPE with merges extracted by transformers) from that tokenizer.model",
            "class": type(converted).__name__,
            "equal_to_reference": converted_ids == reference,
            "bare_tokenizer_json_equal": bare_ids == converted_ids,
            "books_differing": [row["index"] for row in converted_rows if "differs_from_reference_at" in row],
            "roundtrip_failures": [row for row in converted_rows if "roundtrip" in row],
            "differences": summarize_spans(converted_spans),
            "total": converted_total,
            "books": [
                {key: row[key] for key in ("index", "tokens", "sha256", "differs_from_reference_at") if key in row}
                for row in converted_rows
            ],
        },
        "transformers_from_gguf": {
            "how": "AutoTokenizer.from_pretrained(folder, gguf_file=name)(text)['input_ids']",
            "class": type(from_gguf).__name__,
            "model_type": gguf_backend["model"]["type"],
            "bos_added": all(ids[:1] == [BOS_ID] for ids in gguf_ids),
            "equal_to_reference": gguf_ids == reference,
            "bare_tokenizer_json_equal": gguf_bare_ids == gguf_ids,
            "books_differing": sum(1 for row in gguf_rows if "differs_from_reference_at" in row),
            "roundtrip_failures": sum(1 for row in gguf_rows if "roundtrip" in row),
            "example": hello,
            "total": gguf_total,
            "books": [
                {key: row[key] for key in ("index", "tokens", "sha256", "differs_from_reference_at") if key in row}
                for row in gguf_rows
            ],
        },
    }
    log(
        f"reference: {ref_total['tokens']} tokens; converted equal: {converted_ids == reference}, "
        f"its tokenizer.json equal: {bare_ids == converted_ids}; transformers-from-GGUF equal: {gguf_ids == reference} "
        f"({gguf_total['tokens']} tokens, BOS added: {tokenizer_record['transformers_from_gguf']['bos_added']})"
    )

    log("loading the model from the GGUF (dequantized to float32)")
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config_found, config_wrong = check_config(model.config)
    assert not config_wrong, f"config from the GGUF differs from the architecture: {config_wrong}"
    log("checking the loaded tensors against the gguf dequantization")
    mapping, quant_types, norm_raw = check_weights(model, reader)
    embed_scale = model.model.embed_tokens.embed_scale
    assert embed_scale.dtype == torch.float32 and embed_scale.item() == np.float32(math.sqrt(640))

    log(f"dense forward pass over {DENSE_TOKENS} tokens of book 0 (with BOS)")
    with_bos = reference[0][:DENSE_TOKENS]
    nll = dense_nlls(model, with_bos)
    log("and without BOS")
    without_bos = reference[0][1 : DENSE_TOKENS + 1]
    nll_no_bos = dense_nlls(model, without_bos)
    ppl, ppl_no_bos = math.exp(nll.mean().item()), math.exp(nll_no_bos.mean().item())
    log(f"PPL with BOS {ppl:.4f}, without {ppl_no_bos:.4f}")

    elapsed = time.time() - started
    result = {
        "model": str(args.gguf.relative_to(ROOT) if args.gguf.is_relative_to(ROOT) else args.gguf),
        "gguf_sha256": gguf_sha,
        "gguf_bytes": args.gguf.stat().st_size,
        "gguf_metadata": metadata,
        "corpus": str(args.corpus.relative_to(ROOT) if args.corpus.is_relative_to(ROOT) else args.corpus),
        "corpus_sha256": sha256_file(args.corpus),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "sentencepiece": sentencepiece.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "accelerate": importlib.metadata.version("accelerate"),
            "pyarrow": importlib.metadata.version("pyarrow"),
            "numpy": np.__version__,
        },
        "seconds": round(elapsed, 1),
        "tokenizer": tokenizer_record,
        "ids_sha256": "sha256 of the ids as little-endian u32 bytes; each book's ids start with BOS 2; total = all "
        "books' ids concatenated in corpus order",
        "books": ref_rows,
        "total": ref_total,
        "book0_first_ids": reference[0][:64],
        "model_loading": {
            "how": "AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, "
            "attn_implementation='eager'): every tensor dequantized by gguf.dequantize to float32; transformers "
            "subtracts 1 from every *norm.weight (llama.cpp stores 1 + w); checked tensor by tensor here",
            "class": type(model).__name__,
            "config": config_found,
            "config_fixes": "none needed: every checked field matched",
            "rms_norm_eps": model.config.rms_norm_eps,
            "embed_scale": embed_scale.item(),
            "gguf_quant_types": quant_types,
            "gguf_to_transformers": {k: v for k, v in mapping.items() if not k.startswith("blk.") or k.startswith("blk.0.")},
            "layer0_gguf_norm_values": norm_raw,
        },
        "dense": {
            "book": 0,
            "title": books[0]["title"],
            "tokens": len(with_bos),
            "nll_definition": "nll[i] = -log_softmax(logits[i])[ids[i + 1]], one float32 eager forward pass over ids",
            "with_bos": {
                "ids": "reference ids of book 0 [0, 2048): BOS + 2047 text ids",
                "ppl": ppl,
                "mean_nll": nll.mean().item(),
                "nll": [round(value, 6) for value in nll.tolist()],
            },
            "without_bos": {
                "ids": "reference ids of book 0 [1, 2049): the first 2048 text ids, no BOS",
                "ppl": ppl_no_bos,
                "mean_nll": nll_no_bos.mean().item(),
                "nll": [round(value, 6) for value in nll_no_bos.tolist()],
            },
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
