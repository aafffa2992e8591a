from .arcee_zigma_transformer import PRESETS, ArceeZigmaTransformer, preset_config

__all__ = ["PRESETS", "ArceeZigmaTransformer", "preset_config"]
