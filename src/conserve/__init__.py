"""conserve: co-serving latency-critical online and latency-tolerant offline LLM requests."""

from conserve.errors import ConserveError, ModelLoadError, RequestError
from conserve.outputs import CompletionOutput, RequestOutput
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestClass", "ConserveError",
           "ModelLoadError", "RequestError", "__version__"]


def __getattr__(name: str):
    # Import the engine (and torch) only when LLM is used: the CLI and torch-free parts stay light.
    if name == "LLM":
        from conserve.llm import LLM

        return LLM
    raise AttributeError(name)
