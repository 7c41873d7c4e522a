from train.losses.infonce import InfoNCELoss

__all__ = ["InfoNCELoss"]
