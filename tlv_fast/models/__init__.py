"""BERT, GPT, ViT and STTR built from tlv_fast.nn."""
from .bert import BERT
from .configs import BERTConfig, GPTConfig, STTRConfig, ViTConfig
from .gpt import GPT
from .sttr import STTR
from .sttr_head import gt_response, stereo_metrics, sttr_loss, window_regression
from .vit import ViT

__all__ = ["BERT", "BERTConfig", "GPT", "GPTConfig", "STTR", "STTRConfig", "ViT", "ViTConfig", "gt_response",
           "stereo_metrics", "sttr_loss", "window_regression"]
