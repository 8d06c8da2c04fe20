"""mmhpc: serve multimodal LLMs (encode / prefill / decode) from one MPI job."""
from mmhpc.engine.sequence import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):  # lazy: `import mmhpc` must not pull torch into the frontend
    if name == "LLM":
        from mmhpc.llm import LLM
        return LLM
    raise AttributeError(name)
