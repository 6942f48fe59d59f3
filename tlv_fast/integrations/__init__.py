"""Drop-in integrations: Hugging Face's attention interface (tlv_fast.integrations.transformers), module swapping
and an F.scaled_dot_product_attention override (tlv_fast.integrations.torch)."""
