"""Segmentation networks (DAFormer on a SegFormer MiT encoder)."""

from mic_uda.models.daformer import DAFormerHead, DAFormerNet, build_daformer

__all__ = ["DAFormerHead", "DAFormerNet", "build_daformer"]
