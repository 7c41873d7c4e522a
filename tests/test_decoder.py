"""Decoder-only backbones, in one process: tokenizer and pooling set up as LLM embedders use them,
the release encoding as training did, soft masking's two ends and its weights, LoRA merged = unmerged,
instructions as named prompts that mteb finds. Tiny random Qwen3 and Llama checkpoints are built at
test time (bench/tiny_model.py): nothing comes from the hub."""
import json

import pytest
import torch
from sentence_transformers import SentenceTransformer

from bench.tiny_model import make_tiny_decoder
from train.models.attention import set_attention, soft_mask_bias
from train.models.backbone import BackboneOptions, has_sentence_transformers_config, prepare_backbone
from train.models.decoder import backbone, is_decoder_only
from train.models.lora import add_lora, has_lora, merge_lora
from train.models.model import open_sentence_transformer, with_expansion

TEXTS = ["如何训练中文向量模型？", "今天天气很好", "你好", "五次环法自行车赛冠军兰斯·阿姆斯特朗今天在丹佛参加了一个会议。"]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def decoder_dir(request, tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp(request.param) / "model", request.param)


def open_decoder(path, **options):
    model = open_sentence_transformer(str(path), local_only=True)
    return model, prepare_backbone(model, has_sentence_transformers_config(str(path), True), BackboneOptions(**options))


def test_a_decoder_gets_a_pad_token_eos_left_padding_and_last_token_pooling(decoder_dir):
    raw = SentenceTransformer(str(decoder_dir), device="cpu")
    assert raw.tokenizer.pad_token is None  # as Llama's and Mistral's tokenizers ship
    assert raw.tokenizer("你好")["input_ids"][-1] != raw.tokenizer.eos_token_id
    model, setup = open_decoder(decoder_dir)
    assert setup.decoder and is_decoder_only(model)
    tok = model.tokenizer
    batch = tok(TEXTS[:3], padding=True)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1      # every row ends with its EOS
        assert mask == sorted(mask)                               # padding on the left
    if tok.bos_token is not None:  # Llama: the BOS it added is kept, before the text
        assert all(ids[mask.index(1)] == tok.bos_token_id for ids, mask in zip(batch["input_ids"], batch["attention_mask"]))
    pooling = model[1].get_config_dict()
    assert pooling["pooling_mode"] == "lasttoken"
    # truncation keeps the EOS: the post-processor adds it after cutting
    assert tok("长" * 500, truncation=True, max_length=16)["input_ids"][-1] == tok.eos_token_id


def test_a_text_encodes_the_same_alone_and_in_a_padded_batch(decoder_dir):
    model, _ = open_decoder(decoder_dir)
    alone = torch.stack([model.encode(t, convert_to_tensor=True) for t in TEXTS])
    together = model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    assert (alone - together).abs().max() < 1e-4


def test_the_saved_setup_encodes_as_the_one_in_memory(decoder_dir, tmp_path):
    model, _ = open_decoder(decoder_dir)
    model.save(str(tmp_path / "release"))
    reloaded = SentenceTransformer(str(tmp_path / "release"), device="cpu")
    assert reloaded.tokenizer.padding_side == "left" and reloaded.tokenizer.pad_token is not None
    assert (reloaded.encode(TEXTS, convert_to_tensor=True) - model.encode(TEXTS, convert_to_tensor=True)).abs().max() < 1e-5


def test_a_model_with_its_own_sentence_transformers_config_keeps_it(decoder_dir, tmp_path):
    from sentence_transformers.sentence_transformer.modules import Pooling
    model = open_sentence_transformer(str(decoder_dir), local_only=True)
    model._modules["1"] = Pooling(model.get_embedding_dimension(), pooling_mode="mean")
    model.tokenizer.pad_token = model.tokenizer.eos_token
    model.save(str(tmp_path / "own"))
    own, setup = open_decoder(tmp_path / "own")
    assert setup.own_config
    assert own[1].get_config_dict()["pooling_mode"] == "mean" and own.tokenizer.padding_side == "right"


def test_soft_mask_weights_follow_the_schedule():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])       # left-padded: l = 4 real tokens
    bias = soft_mask_bias(mask, alpha=0.5)[0, 0]
    weight = bias.exp()
    for qi in range(2, 6):
        i = qi - 1                                  # 1-based position of the query among the real tokens
        for kj in range(2, 6):
            expected = 1.0 if kj <= qi else min(0.5 * 4 / i, 1.0)
            assert weight[qi, kj].item() == pytest.approx(expected, rel=1e-6)
    assert (weight[:, :2] == 0).all()               # padding keys are never attended
    assert (soft_mask_bias(mask, 0.0)[0, 0].exp()[2:, 2:] == torch.ones(4, 4).tril()).all()   # causal
    assert (soft_mask_bias(mask, 1.0)[0, 0][2:, 2:] == 0).all()                                 # bidirectional


def test_soft_mask_is_the_causal_model_at_alpha_0_and_the_bidirectional_one_at_alpha_1(decoder_dir):
    model, _ = open_decoder(decoder_dir)
    causal = model.encode(TEXTS, convert_to_tensor=True)
    soft = set_attention(backbone(model), "soft")
    soft.at_step(0, 10)
    assert torch.equal(model.encode(TEXTS, convert_to_tensor=True), causal)
    assert soft.at_step(5, 10) == 0.5
    halfway = model.encode(TEXTS, convert_to_tensor=True)
    soft.at_step(10, 10)
    at_one = model.encode(TEXTS, convert_to_tensor=True)
    soft.remove()
    set_attention(backbone(model), "bidirectional")   # config.is_causal = False, what the release carries
    both_ways = model.encode(TEXTS, convert_to_tensor=True)
    assert (at_one - both_ways).abs().max() < 1e-5
    assert (both_ways - causal).abs().max() > 1e-2 and (halfway - causal).abs().max() > 1e-3
    assert (halfway - both_ways).abs().max() > 1e-4


def test_lora_merged_equals_unmerged_and_the_release_is_not_the_base(decoder_dir, tmp_path):
    model, _ = open_decoder(decoder_dir)
    base = model.encode(TEXTS, convert_to_tensor=True)
    trainable = add_lora(model, rank=4, alpha=8, targets="q_proj,v_proj,down_proj")
    assert trainable and all(not p.requires_grad for n, p in backbone(model).named_parameters() if "lora_" not in n)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:          # as training would leave them (LoRA starts as no change at all)
            torch.nn.init.normal_(p, std=0.05)
    unmerged = model.encode(TEXTS, convert_to_tensor=True)
    merge_lora(model)
    assert not has_lora(model)
    model.save(str(tmp_path / "merged"))
    release = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    merged = release.encode(TEXTS, convert_to_tensor=True)
    assert (merged - unmerged).abs().max() < 1e-4 * unmerged.abs().max()
    assert (merged - base).abs().max() > 1e-2
    assert not (tmp_path / "merged/adapter_config.json").exists()
    assert not any("lora" in k for k in release.state_dict())


def test_unknown_lora_targets_are_named(decoder_dir):
    model, _ = open_decoder(decoder_dir)
    with pytest.raises(SystemExit, match="lora-targets no_such_layer"):
        add_lora(model, 4, 8, "no_such_layer")


def test_attention_modes_are_for_decoders_only(tiny_model):
    model = open_sentence_transformer(str(tiny_model), local_only=True)
    with pytest.raises(SystemExit, match="encoder"):
        prepare_backbone(model, True, BackboneOptions(attention="soft"))


def test_soft_masking_a_model_that_attends_both_ways_already_is_refused(decoder_dir):
    model, _ = open_decoder(decoder_dir, attention="bidirectional")
    with pytest.raises(SystemExit, match="already attends bidirectionally"):
        set_attention(backbone(model), "soft")


def test_no_expansion_layer_by_default_past_1024_dims(tmp_path):
    wide = make_tiny_decoder(tmp_path / "wide", "qwen3", hidden=1088, layers=1, heads=2, intermediate=64)
    model, _ = open_decoder(wide)
    model, added, what = with_expansion(model, "auto")
    assert added == 0 and "1088 wide" in what
    _, added, _ = with_expansion(model, "1280")       # asked for: added
    assert added == 1280


def test_instructions_become_named_prompts_that_mteb_finds(tmp_path):
    from mteb import get_task
    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType

    from train.finetune import release_prompts
    from train.kinds.tasks import load_data_config
    from train.models.decoder import instruction_prompt
    demo = tmp_path / "tasks.json"
    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "data/demo/finetune"
    demo.write_text(json.dumps({"tasks": {
        "retrieval": {"type": "retrieval", "files": [str(root / "retrieval.jsonl")], "batch_size": 8,
                      "num_negatives": 2, "instruction": "Given a question, retrieve passages that answer it"},
        "sts": {"type": "sts", "files": [str(root / "sts.jsonl")], "batch_size": 8,
                "instruction": "Retrieve semantically similar text"}}}))
    config = load_data_config(demo)
    for t in config.tasks:  # what finetune.open_model does with an instruction and no other prompt
        t.query_prompt, t.passage_prompt = instruction_prompt(t.instruction), ""
    prompts = release_prompts(config.tasks)
    assert prompts["Retrieval-query"] == "Instruct: Given a question, retrieve passages that answer it\nQuery: "
    assert prompts["Retrieval-document"] == "" and prompts["STS"].endswith("similar text\nQuery: ")
    assert prompts["sts"] == prompts["STS"]
    retrieval, sts = get_task("T2Retrieval").metadata, get_task("ATEC").metadata
    assert get_prompt_name(prompts, retrieval, PromptType.query) == "Retrieval-query"
    assert get_prompt_name(prompts, retrieval, PromptType.document) == "Retrieval-document"
    assert get_prompt_name(prompts, sts, PromptType.query) == "STS"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": {"sts": {"type": "sts", "files": [str(root / "sts.jsonl")],
                                                 "batch_size": 8, "instruction": 3}}}))
    with pytest.raises(ValueError, match="'instruction' must be a string"):
        load_data_config(bad)


def test_the_eval_encodes_each_task_type_with_the_instruction_training_saved(tiny_model):
    from mteb import get_task
    from mteb.types import PromptType

    from eval.cmteb import caching_encoder
    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.prompts = {"query": "query: ", "passage": "passage: ", "Retrieval-query": "Instruct: 检索\nQuery: ",
                     "Retrieval-document": "", "STS": "Instruct: 相似\nQuery: ", "sts": "Instruct: 相似\nQuery: "}
    encoder = caching_encoder(model, None, {}, "m")
    retrieval, sts, classification = (get_task(n).metadata for n in ("T2Retrieval", "ATEC", "TNews"))

    def prompt(task, side):
        return encoder.model_prompts[encoder.get_prompt_name(task, side)]
    assert prompt(retrieval, PromptType.query) == "Instruct: 检索\nQuery: "
    assert prompt(retrieval, PromptType.document) == ""                # documents bare, as trained
    assert prompt(sts, PromptType.query) == "Instruct: 相似\nQuery: "
    assert prompt(classification, PromptType.query) == "query: "       # no instruction saved for it


def test_soft_masking_needs_a_kernel_that_takes_a_float_mask(decoder_dir):
    model, _ = open_decoder(decoder_dir)
    config = backbone(model).config
    config.__dict__["_attn_implementation_internal"] = "flash_attention_2"  # as loading with flash-attn sets it
    if config._attn_implementation != "flash_attention_2":
        pytest.skip("this transformers keeps the kernel elsewhere")
    with pytest.raises(SystemExit, match="float attention mask"):
        set_attention(backbone(model), "soft")
