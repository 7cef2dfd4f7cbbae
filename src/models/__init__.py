from .vit import VisionTransformer, Attention, MatMul, Mlp, Block, PatchEmbed
from .registry import create_model, register_model, list_models, get_data_config

__all__ = ["VisionTransformer", "Attention", "MatMul", "Mlp", "Block", "PatchEmbed",
           "create_model", "register_model", "list_models", "get_data_config"]
