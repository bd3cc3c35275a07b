"""Reward functions for online methods (GRPO, PPO, best-of-n, eval): verifiable checks, a registry, and
the one builder of their inputs (`inputs.reward_inputs`).

Every reward function: ``fn(prompts: list[str], completions: list[str], **fields) -> list[float]``,
each ``fields[name]`` a list aligned with ``completions``. See ``docs/rewards.md``.
"""
from alignkit.rewards.builtin import (
    THINK_ANSWER_PATTERN,
    case_insensitive_match,
    contains,
    exact_match,
    extract_final_number,
    length_penalty,
    numeric_match,
    parse_number,
    regex_format,
    think_format,
    valid_json,
)
from alignkit.rewards.combine import (
    CombinedReward,
    RewardFunctionError,
    RewardResult,
    RewardSpec,
)
from alignkit.rewards.inputs import prompt_text, reward_inputs
from alignkit.rewards.registry import (
    RewardFunction,
    RewardSpecError,
    available_reward_functions,
    get_reward_function,
    load_reward_plugins,
    register,
    register_factory,
    unregister,
)

__all__ = [
    "THINK_ANSWER_PATTERN",
    "CombinedReward",
    "RewardFunction",
    "RewardFunctionError",
    "RewardResult",
    "RewardSpec",
    "RewardSpecError",
    "available_reward_functions",
    "case_insensitive_match",
    "contains",
    "exact_match",
    "extract_final_number",
    "get_reward_function",
    "load_reward_plugins",
    "prompt_text",
    "reward_inputs",
    "length_penalty",
    "numeric_match",
    "parse_number",
    "regex_format",
    "register",
    "register_factory",
    "think_format",
    "unregister",
    "valid_json",
]
