"""The Label Studio connection: where the server is and the API key to reach it."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator


class LabelStudio(Block):
    """A Label Studio server. The API key is a legacy token or a personal access token (JWT)."""

    _block_type_name = "Label Studio"
    _description = "Label Studio server URL and API key for the curation flows."

    url: str = Field(description="Base URL, e.g. http://label-studio.internal:8080")
    api_key: SecretStr = Field(description="Account settings → Access Token (legacy token or personal access token).")
    timeout_seconds: float = Field(30.0, gt=0, description="Per-request timeout.")
    retries: int = Field(3, ge=0, description="Retries of a call that failed on the network or with a 5xx answer.")
    retry_delay_seconds: float = Field(5.0, ge=0)

    @field_validator("url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")  # the URL is part of the key of stored tasks and annotations
