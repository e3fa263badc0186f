"""moeserve: a serving server for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"

from moeserve.llm import LLM  # noqa: E402
from moeserve.request import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "__version__"]
