"""Small language models built on NSA (or full attention, for comparison)."""
from .llama import ATTENTIONS, FullAttention, KVCache, LlamaLM, ModelConfig, sample

__all__ = ["ATTENTIONS", "FullAttention", "KVCache", "LlamaLM", "ModelConfig", "sample"]
