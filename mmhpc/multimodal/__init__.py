"""Multimodal inputs: chat template, tokenization and image preprocessing (no model weights)."""
from mmhpc.multimodal.processor import InputProcessor, image_hash, tensor_hash

__all__ = ["InputProcessor", "image_hash", "tensor_hash"]
