"""Server settings: one pydantic-settings class, read from `LMSERVE_*` environment variables, which the
`lmserve serve` flags override field by field (see service/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import DTYPES

ROOT = Path(__file__).resolve().parents[1]
DtypeName = Literal[tuple(DTYPES)]  # type: ignore[valid-type]  # the names model.config declares


def default_model() -> Path:
    """The bundled checkpoint: beside the sources (a checkout or editable install), else under the working
    directory (an installed package run from the project directory, as in the Docker image)."""
    candidates = [ROOT / "checkpoints" / "default", Path.cwd() / "checkpoints" / "default"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


class Settings(BaseSettings):
    """Everything `lmserve serve` can be told; each field is also the env var LMSERVE_<FIELD> and the flag
    --<field-with-dashes>."""

    model_config = SettingsConfigDict(env_prefix="LMSERVE_", extra="ignore",
                                      protected_namespaces=())

    model: Path = Field(default_factory=default_model, description="checkpoint directory to serve")
    model_name: str | None = Field(None, description="name the API reports and expects in 'model' "
                                                     "(default: the checkpoint directory's name)")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    dtype: DtypeName | None = Field(
        None, description="weight dtype (default: bfloat16 on CUDA, float32 on CPU)")
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together (KV-cache rows)")
    max_seq_len: int | None = Field(None, ge=2, description="context length per sequence (default: the model's)")
    max_prefill_tokens: int = Field(512, ge=1, description="prompt tokens computed per engine step")
    max_queue: int = Field(256, ge=1, description="waiting requests beyond which new ones get 503")
    cuda_graphs: bool = Field(True, description="capture the decode step as CUDA graphs (CUDA only)")
    seed: int = Field(0, ge=0, description="sampling seed for requests that bring none")
    request_timeout: float = Field(600.0, gt=0, description="seconds before a request is aborted "
                                                            "(finish_reason 'abort')")
    api_key: SecretStr | None = Field(None, description="if set, required as 'Authorization: Bearer KEY' "
                                                        "or 'x-api-key: KEY'")
    max_body_bytes: int = Field(1 << 20, ge=1, description="larger request bodies get 413")
    max_prompts: int = Field(64, ge=1, description="most prompts (x n choices) in one request")
    max_connections: int = Field(1024, ge=1, description="open connections beyond which new ones get 503 "
                                                         "(kept below the open-file limit)")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's headers "
                                                          "(then 408)")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client has to send a request's body (then 408)")
    write_timeout: float = Field(30.0, gt=0, description="seconds a client may read nothing of a response before "
                                                         "it is dropped")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle kept-alive connection stays open")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.resolve().name
