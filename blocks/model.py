"""The model and engine configuration, saved once and named by runs and deployments."""

from __future__ import annotations

from prefect.blocks.core import Block

from tasks.config import ModelConfig


class InferenceModel(Block):
    """A model and the vLLM engine arguments to serve it (or an OpenAI-compatible endpoint).

    The openai engine's API key stays in a Prefect Secret block named by `api_key_secret`: a flow
    run's parameters are stored and shown in the UI, a Secret's value is not.
    """

    _block_type_name = "Inference Model"
    _description = "Model folder and vLLM engine arguments for batch_inference."

    config: ModelConfig
