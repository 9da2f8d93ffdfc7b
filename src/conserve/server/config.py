"""ServerConfig: the flags of `conserve serve` beyond the engine's (EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conserve.flags import Flagged, flag


@dataclass
class ServerConfig(Flagged):
    host: str = flag("127.0.0.1", "address to listen on", group="server")
    port: int = flag(8000, "port to listen on", group="server")
    data_dir: str = flag(str(Path.home() / ".local/share/conserve"), "uploaded files, batch jobs and their "
                         "results (survive restarts)", group="server", shown_default="`~/.local/share/conserve`")
    api_key: str | None = flag(None, "require `Authorization: Bearer KEY` on `/v1/*`", group="server", type=str,
                               metavar="KEY")
    served_model_name: str | None = flag(None, "model id reported by the API", group="server", type=str,
                                         shown_default="the model's file name")
    max_upload_mb: float = flag(512.0, "largest accepted file upload, MiB", group="server")
    max_batch_concurrency: int = flag(64, "batch lines in the engine at once, over all batches (keeps offline "
                                      "work saturated)", group="server")
    batch_max_engine_faults: int = flag(3, "a batch line in flight when the engine fails is run again once the "
                                        "engine is back; at its Nth engine fault it is committed as failed with "
                                        "a `server_error` (1: no retries)", group="server", metavar="N")
    batch_deadlines: bool = flag(True, "serve batches earliest deadline first (`created_at` + `completion_window`): "
                                 "their lines get engine slots, and offline scheduling, in deadline order, flex "
                                 "requests after them; off: arrival order", group="server")
    trust_request_chat_template: bool = flag(False, "run the `chat_template` a chat request brings (off: a "
                                             "template is code, such requests get 400); each one renders in a "
                                             "sandbox process with a time and memory limit", group="server")
    request_chat_template_timeout: float = flag(5.0, "time limit for rendering a request's own chat template, "
                                                "seconds; a template that runs longer gets 400", group="server",
                                                metavar="SECONDS")
    max_waiting_requests: int = flag(256, "HTTP requests of one class waiting for their first token; beyond it "
                                     "the server answers 429 with Retry-After (0: no limit). Batch API lines "
                                     "are never refused: they wait in the durable store", group="server")
    max_waiting_flex_requests: int | None = flag(None, "the same limit for flex (offline) HTTP requests", type=int,
                                                 group="server", shown_default="`--max-waiting-requests`")
    max_predicted_ttft_factor: float = flag(5.0, "answer 429 to an online request whose predicted time to first "
                                            "token (the latency model's prefill time of the online prompts "
                                            "waiting ahead of it and its own) exceeds this multiple of "
                                            "`--slo-ttft-ms`; only when others wait ahead of it (0: off)",
                                            group="server")
    max_engine_restarts: int = flag(5, "after a step fails, in-flight requests get 503 and the engine is rebuilt "
                                    "(model reloaded); give up after this many consecutive failed restarts, then "
                                    "`/health` and requests answer 503 (0: never restart)", group="server")
    engine_restart_backoff_s: float = flag(1.0, "wait before the first restart, seconds; doubles with each "
                                           "consecutive failure, at most 60 s", group="server")

    @property
    def flex_waiting_limit(self) -> int:
        return self.max_waiting_requests if self.max_waiting_flex_requests is None else self.max_waiting_flex_requests

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if self.max_batch_concurrency < 1:
            raise ValueError(f"max_batch_concurrency must be >= 1, got {self.max_batch_concurrency}")
        if self.batch_max_engine_faults < 1:
            raise ValueError(f"batch_max_engine_faults must be >= 1, got {self.batch_max_engine_faults}")
        if self.max_waiting_requests < 0 or (self.max_waiting_flex_requests or 0) < 0:
            raise ValueError("max_waiting_requests and max_waiting_flex_requests must be >= 0")
        if self.max_predicted_ttft_factor < 0 or self.max_engine_restarts < 0 or self.engine_restart_backoff_s < 0:
            raise ValueError("max_predicted_ttft_factor, max_engine_restarts and engine_restart_backoff_s must be >= 0")
        if not self.request_chat_template_timeout > 0:
            raise ValueError(f"request_chat_template_timeout must be > 0, got {self.request_chat_template_timeout}")
