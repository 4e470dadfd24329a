"""Client library: run a model through the swarm (forward, backward, generate)."""

from .model import CausalLMOutput, DistributedModelForCausalLM

__all__ = ["CausalLMOutput", "DistributedModelForCausalLM"]
