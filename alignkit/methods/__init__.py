"""Training methods: one registry (`registry.register_method`), the shared run (`base.run_job`), and
one module per method (sft, reward, dpo, grpo, ppo; online and preference hold what they share)."""
from alignkit.methods.registry import (
    METHODS,
    Method,
    build_job,
    get_method,
    load_job,
    methods,
    register_method,
)

__all__ = ["METHODS", "Method", "build_job", "get_method", "load_job", "methods", "register_method"]
