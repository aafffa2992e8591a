from .arcee_zigma_transformer import ArceeZigmaTransformer
from .variants import PRESETS, VARIANTS, Variant, get_variant, preset_config

__all__ = ["PRESETS", "VARIANTS", "ArceeZigmaTransformer", "Variant", "get_variant", "preset_config"]
