"""A tiny sentence-transformers model built in code (no hub): char-level WordPiece + a 2-layer BERT."""
from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def demo_texts() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data/demo").rglob("*.jsonl")):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            texts += [v for k, v in row.items() if isinstance(v, str)]
            texts += [t for k, v in row.items() if isinstance(v, list) for t in v if isinstance(t, str)]
    return texts


def make_tiny_model(out_dir: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0,
                    prompts: dict[str, str] | None = None, include_prompt: bool = True, heads: int = 2,
                    intermediate: int | None = None, vocab_size: int | None = None, max_length: int = 64,
                    pooling: str = "mean") -> Path:
    """Save a tiny SentenceTransformer (mean pooling unless told, normalized) to out_dir and return the path.

    include_prompt=False: the pooling leaves prompt tokens out (INSTRUCTOR-style models). The shape
    arguments build other sizes with random weights (bench/base_model.py's BERT-large shape):
    vocab_size pads the embedding matrix past the demo data's WordPiece vocabulary."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, decoders, models as tok_models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(tok_models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=3000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(demo_texts() + ["query: passage: "], trainer=trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max(128, max_length))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=max(vocab_size or 0, tok.get_vocab_size()), hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate or hidden * 2,
                        max_position_embeddings=max(128, max_length),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf_dir = out_dir / "_hf"
    BertModel(config).save_pretrained(hf_dir)
    fast.save_pretrained(hf_dir)
    encoder = Transformer(str(hf_dir), max_seq_length=max_length)
    model = SentenceTransformer(modules=[encoder, Pooling(hidden, pooling_mode=pooling, include_prompt=include_prompt), Normalize()],
                                device="cpu", prompts=prompts or {})
    model.save(str(out_dir))
    import shutil
    shutil.rmtree(hf_dir)
    return out_dir


DECODER_ARCHS = ("qwen3", "llama")


def make_tiny_decoder(out_dir: str | Path, arch: str = "qwen3", hidden: int = 32, layers: int = 2, seed: int = 0,
                      heads: int = 2, kv_heads: int = 1, intermediate: int | None = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny decoder-only LLM checkpoint as the hub ships them (a *ForCausalLM model, its
    tokenizer, no sentence-transformers files) and return the path: Qwen3-style (EOS <|endoftext|>,
    no BOS) or Llama-style (BOS <s> added, EOS </s>); neither tokenizer has a pad token or appends EOS,
    as the real ones do not. Random weights: the learning checks train it from here."""
    from tokenizers import Tokenizer, decoders, models as tok_models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    if arch not in DECODER_ARCHS:
        raise ValueError(f"arch must be one of {DECODER_ARCHS}")
    out_dir = Path(out_dir)
    special = ["<|endoftext|>", "<unk>"] if arch == "qwen3" else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(tok_models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # the instruction format's words as whole tokens, as a real LLM vocabulary has them
    tok.train_from_iterator(demo_texts() + ["Instruct: Query: "] * 100, trainer=trainers.WordPieceTrainer(
        vocab_size=4000, special_tokens=special))
    if arch == "llama":
        tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       model_max_length=256)
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                                       model_max_length=256)
    shape = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate or hidden * 2,
                 max_position_embeddings=256, eos_token_id=fast.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // heads, **shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(bos_token_id=fast.bos_token_id, **shape))
    model.to(dtype).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
