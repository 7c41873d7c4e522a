"""Decoder-only LLM backbones (Qwen2/Qwen3, Llama, Mistral) as embedders, the way Qwen3-Embedding,
gte-Qwen2 and FlagEmbedding's decoder-only trainer use them:

  - a pad token where the tokenizer has none (its EOS: Llama's and Mistral's tokenizers lack one,
    and padding a batch raises);
  - EOS appended to every text by the tokenizer itself (its post-processor, saved in tokenizer.json),
    so last-token pooling reads a token that has seen the whole text, in training and in the release
    alike; truncation keeps it, as the post-processor adds it after truncating;
  - left padding, so the last position of every row is its EOS (rotary positions are relative, so
    the shift does not change a row's attention among its own tokens);
  - last-token pooling.

A model that already carries a sentence-transformers config (Qwen3-Embedding's modules.json: its own
pooling, padding side and EOS) keeps it; only a missing pad token is filled in.
"""
from __future__ import annotations

from sentence_transformers import SentenceTransformer

INSTRUCTION_FORMAT = "Instruct: {instruction}\nQuery: "  # Qwen3-Embedding's, gte-Qwen2's and e5-mistral's


def instruction_prompt(instruction: str | None, template: str = INSTRUCTION_FORMAT) -> str | None:
    """The query prompt for a task instruction ("" for none given as ""; None when there is none)."""
    if instruction is None:
        return None
    return template.format(instruction=instruction) if instruction else ""


def check_prompt_room(model: SentenceTransformer, prompts: dict[str, str], max_length: int) -> None:
    """Stop when a prompt leaves less than half of --max-length for the text: a long instruction under a
    short training length cuts every text away and leaves the prompt alone, which every text then
    shares (all embeddings alike, InfoNCE stuck at log(batch))."""
    for name, prompt in prompts.items():
        if prompt:
            length = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if length > max_length // 2:
                raise SystemExit(f"the {name} prompt {prompt!r} is {length} tokens, more than half of --max-length "
                                 f"{max_length}: the texts would be cut away. Shorten it or raise --max-length")


def backbone(model: SentenceTransformer):
    """The transformers model inside the first (Transformer) module."""
    return model[0].auto_model


def is_decoder_only(model: SentenceTransformer) -> bool:
    """A causal-LM architecture with no masked-LM form (BERT and XLM-R have both and are encoders)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    model_type = getattr(backbone(model).config, "model_type", "")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def appends_eos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def append_eos(tokenizer) -> None:
    """Make the (fast) tokenizer end every text with EOS, keeping a BOS it already adds."""
    from tokenizers.processors import TemplateProcessing
    eos, bos = tokenizer.eos_token, tokenizer.bos_token
    ids = tokenizer("a")["input_ids"]
    keep_bos = bos is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    start = f"{bos}:0 " if keep_bos else ""
    special = [(eos, tokenizer.eos_token_id)] + ([(bos, tokenizer.bos_token_id)] if keep_bos else [])
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{start}$A:0 {eos}:0", pair=f"{start}$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=special)


def prepare_decoder(model: SentenceTransformer, own_config: bool, pooling: str | None = None) -> list[str]:
    """Set up a decoder-only model for embedding (see the module's docstring); returns what was done.
    own_config: the model came with a sentence-transformers config, which is kept; pooling: the
    user's --pooling, which last-token pooling does not override."""
    from train.models.model import set_pooling
    tokenizer, done = model.tokenizer, []
    if tokenizer.eos_token is None:
        raise SystemExit("--model: a decoder-only model whose tokenizer has no EOS token; last-token pooling "
                         "needs one (set tokenizer.eos_token in the model folder)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        done.append(f"pad token = EOS {tokenizer.eos_token!r}")
    if own_config:
        return done + ["its sentence-transformers config kept (pooling, padding side, EOS)"]
    if not appends_eos(tokenizer):
        append_eos(tokenizer)
        done.append("EOS appended to every text")
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
        tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
        done.append("left padding")
    if pooling is None:
        set_pooling(model, "lasttoken")
    return done + [f"{pooling or 'last-token'} pooling"]
