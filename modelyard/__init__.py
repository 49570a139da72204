"""modelyard: multi-model batch LLM pipelines on Prefect 3 and vLLM, with per-row lineage."""

__version__ = "0.1.0"
