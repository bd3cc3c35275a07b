"""alignkit: align language models end to end (SFT, reward models, DPO, GRPO/RFT, PPO, evaluation)."""

__version__ = "0.1.0"
