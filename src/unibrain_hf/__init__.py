"""UniBrain (unified brain-MRI sequence imputation and reasoning, on BAGEL-7B-MoT) for Hugging Face.

    from unibrain_hf import UniBrainPipeline
    pipe = UniBrainPipeline.from_pretrained("path/to/converted")

Importing the package registers ``model_type="unibrain"`` with ``AutoConfig`` / ``AutoModel``.
"""

from transformers import AutoConfig, AutoModel

from .modeling.configuration_unibrain import UniBrainConfig
from .modeling.modeling_unibrain import UniBrainForConditionalGeneration, UniBrainOutput
from .processing.processor import UniBrainProcessor

AutoConfig.register("unibrain", UniBrainConfig, exist_ok=True)
AutoModel.register(UniBrainConfig, UniBrainForConditionalGeneration, exist_ok=True)

__version__ = "0.1.0"


def __getattr__(name):
    # The pipeline pulls in diffusers' pipeline machinery; import it only when asked for.
    if name in ("UniBrainPipeline", "UniBrainPipelineOutput"):
        from .pipelines import pipeline_unibrain

        return getattr(pipeline_unibrain, name)
    raise AttributeError(f"module 'unibrain_hf' has no attribute {name!r}")


__all__ = ["UniBrainConfig", "UniBrainForConditionalGeneration", "UniBrainOutput", "UniBrainProcessor",
           "UniBrainPipeline", "UniBrainPipelineOutput", "__version__"]
