"""Imported once by bench/gpu_suite.py's fork server, so every step process starts with these
modules loaded. A module that is missing or fails to import is left out (the step that needs it
reports the error itself); none of them initialises CUDA on import, which a forked child needs."""
import importlib

MODULES = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "accelerate",
           "alignkit.config", "alignkit.engine", "alignkit.model", "alignkit.data", "alignkit.methods",
           "alignkit.methods.base", "alignkit.methods.sft", "alignkit.methods.dpo", "alignkit.methods.grpo",
           "alignkit.rollout.hf", "alignkit.rollout.static", "datasets", "trl.trainer.dpo_trainer",
           "trl.trainer.grpo_trainer"]

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001 - see the module docstring
        pass
