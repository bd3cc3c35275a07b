"""alignkit: align language models end to end (SFT, reward models, DPO, GRPO/RFT, PPO, evaluation).

The public API is importable from here; names load lazily so `alignkit --help` stays quick::

    from alignkit import load_job, run_job, load_model_and_tokenizer
    summary = run_job(load_job("sft", "examples/sft_support.yaml", ["training.max_steps=10"]))

Every registered method's job and recipe classes are here too, by their class names
(``SFTJob``, ``DPORecipe``, ``GRPOJob``...), without a list to keep up to date.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_job": "alignkit.methods",
    "build_job": "alignkit.methods",
    "register_method": "alignkit.methods",
    "ConfigError": "alignkit.config",
    "TrainingConfig": "alignkit.config",
    "UserError": "alignkit.errors",
    "Engine": "alignkit.engine",
    "TrainingDiverged": "alignkit.engine",
    "run_job": "alignkit.methods.base",
    "load_model_and_tokenizer": "alignkit.model",
    "add_lora": "alignkit.model",
    "save_model": "alignkit.model",
    "merge_adapter": "alignkit.model",
    "ensure_embedded_model": "alignkit.model",
    "EMBEDDED_MODEL": "alignkit.model",
    "load_scalar_model": "alignkit.model.heads",
    "ReferencePolicy": "alignkit.reference",
    "load_examples": "alignkit.data",
    "DataError": "alignkit.data",
    "chat_generate": "alignkit.generation",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name.endswith(("Job", "Recipe")):
        registry = importlib.import_module("alignkit.methods.registry")
        for method in registry.methods().values():
            for cls in (method.job, method.recipe):
                if cls.__name__ == name:
                    return cls
    raise AttributeError(f"module 'alignkit' has no attribute '{name}'")
