from .pipeline_arcee_zigma import ArceeZigmaPipeline, ArceeZigmaPipelineOutput

__all__ = ["ArceeZigmaPipeline", "ArceeZigmaPipelineOutput"]
