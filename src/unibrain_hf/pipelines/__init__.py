"""Inference: ``UniBrainPipeline`` (interleaved imputation + understanding) and its parts.

    python -c "from unibrain_hf.pipelines import UniBrainPipeline; print(UniBrainPipeline.model_cpu_offload_seq)"
"""

from .pipeline_output import UniBrainPipelineOutput
from .pipeline_unibrain import UniBrainPipeline

__all__ = ["UniBrainPipeline", "UniBrainPipelineOutput"]
