"""Models: where they come from (`load`), their LoRA adapters (`peft`), the training forward pass
(`forward`) and scalar heads for reward models and critics (`heads`).

The common names are importable from here: ``from alignkit.model import load_model_and_tokenizer``.
"""
from alignkit.model.load import (
                                 EMBEDDED_MODEL,
                                 ModelLoadError,
                                 alignkit_home,
                                 default_device,
                                 default_dtype,
                                 empty_model,
                                 ensure_embedded_model,
                                 load_adapter,
                                 load_model_and_tokenizer,
                                 load_tokenizer,
                                 resolve_dtype,
                                 resolve_model,
)
from alignkit.model.peft import (
                                 add_lora,
                                 count_parameters,
                                 freeze,
                                 is_peft_model,
                                 merge_adapter,
                                 save_model,
                                 unwrap,
)

__all__ = ["EMBEDDED_MODEL", "ModelLoadError", "add_lora", "alignkit_home", "count_parameters", "default_device",
           "default_dtype", "empty_model", "ensure_embedded_model", "freeze", "is_peft_model", "load_adapter",
           "load_model_and_tokenizer", "load_tokenizer", "merge_adapter", "resolve_dtype", "resolve_model", "save_model", "unwrap"]
