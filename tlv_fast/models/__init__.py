"""BERT, GPT and ViT built from tlv_fast.nn (STTR follows)."""
from .bert import BERT
from .configs import BERTConfig, GPTConfig, ViTConfig
from .gpt import GPT
from .vit import ViT

__all__ = ["BERT", "BERTConfig", "GPT", "GPTConfig", "ViT", "ViTConfig"]
