"""Masks from per-request lengths, shared by the batched models (padding at the end of each row)."""
import torch


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool, True on valid steps (the reference's ``~make_pad_mask``)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths.long()[:, None]
