"""alignkit: align language models end to end (SFT, reward models, DPO, GRPO/RFT, PPO, evaluation).

The public API is importable from here; names load lazily so `alignkit --help` stays quick::

    from alignkit import load_job, run_job, load_model_and_tokenizer
    summary = run_job(load_job("sft", "examples/sft_support.yaml", ["training.max_steps=10"]))
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_job": "alignkit.config",
    "build_job": "alignkit.config",
    "ConfigError": "alignkit.config",
    "TrainingConfig": "alignkit.config",
    "Engine": "alignkit.engine",
    "TrainingDiverged": "alignkit.engine",
    "run_job": "alignkit.methods.base",
    "load_model_and_tokenizer": "alignkit.model",
    "add_lora": "alignkit.model",
    "save_model": "alignkit.model",
    "merge_adapter": "alignkit.model",
    "ensure_embedded_model": "alignkit.model",
    "EMBEDDED_MODEL": "alignkit.model",
    "load_examples": "alignkit.data",
    "DataError": "alignkit.data",
    "chat_generate": "alignkit.generation",
    "SFTJob": "alignkit.methods.sft",
    "SFTRecipe": "alignkit.methods.sft",
    "RewardJob": "alignkit.methods.reward",
    "RewardRecipe": "alignkit.methods.reward",
    "DPOJob": "alignkit.methods.dpo",
    "DPORecipe": "alignkit.methods.dpo",
    "load_scalar_model": "alignkit.model.heads",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alignkit' has no attribute '{name}'")
