"""moeserve: a serving server for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import moeserve.engine.scheduler` stays torch-free and the CLI starts fast.
    if name == "LLM":
        from moeserve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from moeserve.request import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'moeserve' has no attribute {name!r}")
