"""BERT, GPT, ViT and STTR built from tlv_fast.nn; each model's config and presets live beside it, checkpoint
conversion in hf.py (transformers) and sttr_checkpoint.py (the published STTR files)."""
from .bert import BERT, BERTConfig
from .gpt import GPT, GPTConfig
from .sttr import STTR, STTRConfig
from .sttr_head import gt_response, stereo_metrics, sttr_loss, window_regression
from .vit import ViT, ViTConfig

__all__ = ["BERT", "BERTConfig", "GPT", "GPTConfig", "STTR", "STTRConfig", "ViT", "ViTConfig", "gt_response",
           "stereo_metrics", "sttr_loss", "window_regression"]
