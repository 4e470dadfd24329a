"""Challenges that look like client traffic: real prompts through the preceding blocks.

A server sees only the hidden states entering its span. A client's hidden states come
from a tokenised prompt run through the embeddings and every earlier block, and its
decoding steps feed back the model's own next token. We do exactly that with the
reference weights (the verifier holds every block): a built-in prompt corpus, the chat
template when the model ships a tokenizer, greedy continuation by the reference model.
Random tensors would be trivially told apart (wrong scale, no attention-sink token).

Torch only; call `ChallengeFactory.make` from a worker thread.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir

log = logging.getLogger("trustswarm.verifier")

# Short, varied requests of the kind chat users send.
PROMPTS: tuple[str, ...] = (
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three tips for staying focused while studying.",
    "Translate 'good morning, how are you?' into Spanish.",
    "What is the difference between a virus and a bacterium?",
    "Give me a recipe idea that uses rice, eggs and spinach.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Suggest a name for a small bakery by the sea.",
    "What are the primary colors?",
    "Write a short thank-you note to a colleague who helped me move.",
    "How many minutes are there in a week? Show your working.",
    "What should I pack for a three-day hiking trip?",
    "Explain what a hash function is in simple terms.",
    "Tell me a fun fact about octopuses.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Describe the water cycle in four steps.",
    "Write the opening line of a mystery novel set in Venice.",
    "Compare cats and dogs as pets in three bullet points.",
    "What does GDP stand for and what does it measure?",
    "How can I improve my sleep?",
    "Give an example of a metaphor and explain it.",
)
MAX_PROMPT_TOKENS = 96


@dataclass(frozen=True)
class StepInput:
    """One request's worth of input for a span, exactly as a client would send it."""

    hidden: torch.Tensor  # [1, T, H] float32: the output of the blocks before the span
    positions: torch.Tensor  # [1, T] int64
    mask: torch.Tensor  # [1, past + T] int64: covers the whole history (inference)


@dataclass(frozen=True)
class Challenge:
    start: int
    end: int
    prompt: str
    steps: tuple[StepInput, ...]  # one for a forward pass; prefill + decode steps for a session
    grad_outputs: torch.Tensor | None = None  # backward checks: dLoss/d(span output)

    @property
    def total_tokens(self) -> int:
        return int(self.steps[-1].mask.shape[1])


class ChallengeFactory:
    """Builds challenges for any span from the reference model (all blocks)."""

    def __init__(
        self,
        model_dir: ModelDir,
        runner: BlockRunner,
        prompts: tuple[str, ...] = PROMPTS,
        rng: random.Random | None = None,
    ) -> None:
        if runner.start != 0 or runner.end != model_dir.num_blocks:
            raise ValueError("the challenge factory needs a runner over all blocks")
        if not prompts:
            raise ValueError("the prompt corpus is empty")
        self.model_dir = model_dir
        self.runner = runner
        self.parts = model_dir.load_client_parts(torch.float32)
        self.vocab_size = int(self.parts.embed_tokens.weight.shape[0])
        self.prompts = prompts
        self.rng = rng or random.Random()
        self._tokenizer = _load_tokenizer(model_dir)
        self._token_cache: dict[str, list[int]] = {}

    def tokens(self, prompt: str) -> list[int]:
        cached = self._token_cache.get(prompt)
        if cached is None:
            cached = self._tokenize(prompt)[:MAX_PROMPT_TOKENS]
            self._token_cache[prompt] = cached
        return cached

    def _tokenize(self, prompt: str) -> list[int]:
        tok = self._tokenizer
        if tok is not None:
            try:
                if getattr(tok, "chat_template", None):
                    ids = tok.apply_chat_template(
                        [{"role": "user", "content": prompt}],
                        add_generation_prompt=True,
                        tokenize=True,
                        return_dict=True,
                    )["input_ids"]
                else:
                    ids = tok(prompt)["input_ids"]
                ids = [int(i) for i in ids]
                if ids and max(ids) < self.vocab_size:
                    return ids
            except Exception as exc:  # a broken tokenizer: fall back to byte tokens
                log.warning("tokenizer failed (%s); using byte tokens", exc)
        # No tokenizer (e.g. a test model): a deterministic byte-level mapping.
        return [1 + b % (self.vocab_size - 1) for b in prompt.encode()]

    def make(self, start: int, end: int, decode_steps: int = 0) -> Challenge:
        """Inputs for blocks [start, end): the prefill, then `decode_steps` greedy steps."""
        if not 0 <= start < end <= self.model_dir.num_blocks:
            raise ValueError(f"bad span {start}:{end}")
        if decode_steps < 0:
            raise ValueError("decode_steps must be >= 0")
        prompt = self.rng.choice(self.prompts)
        ids = self.tokens(prompt)
        total = len(ids) + decode_steps
        runner = self.runner
        num_blocks = self.model_dir.num_blocks
        before = runner.new_cache(1, total, 0, start) if start > 0 else None
        after = runner.new_cache(1, total, start, num_blocks) if decode_steps else None
        steps: list[StepInput] = []
        tokens = torch.tensor([ids], dtype=torch.long)
        positions = torch.arange(len(ids), dtype=torch.long)[None]
        mask = torch.ones(1, len(ids), dtype=torch.long)
        with torch.inference_mode():
            for i in range(decode_steps + 1):
                h = self.parts.embed_tokens(tokens).float()
                if before is not None:
                    h = runner.step(before, h, positions, mask).float()
                steps.append(StepInput(h.contiguous(), positions, mask))
                if i == decode_steps:
                    break
                out = runner.step(after, h, positions, mask)
                logits = self.parts.lm_head(self.parts.norm(out[:, -1:].float()))
                tokens = logits[:, -1].argmax(-1, keepdim=True)
                positions = positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        return Challenge(start, end, prompt, tuple(steps))

    def make_backward(self, start: int, end: int) -> Challenge:
        """A fine-tuning client's backward request for [start, end): the span's inputs and
        the gradient of the next-token loss on the prompt w.r.t. the span's outputs,
        computed with the reference weights (so its scale and structure are real)."""
        challenge = self.make(start, end)
        step = challenge.steps[0]
        runner, num_blocks = self.runner, self.model_dir.num_blocks
        ids = torch.tensor([self.tokens(challenge.prompt)], dtype=torch.long)
        with torch.inference_mode():
            h_end = runner.forward(step.hidden, step.positions, step.mask, start, end).float()
            h_last = h_end
            if end < num_blocks:
                h_last = runner.forward(h_end, step.positions, step.mask, end, num_blocks).float()
        with torch.enable_grad():
            x = h_last.clone().requires_grad_(True)
            logits = self.parts.lm_head(self.parts.norm(x)).float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
            (grad,) = torch.autograd.grad(loss, x)
        if end < num_blocks:
            grad = runner.backward(h_end, grad, step.positions, step.mask, end, num_blocks)
        return Challenge(start, end, challenge.prompt, challenge.steps, grad.float().contiguous())


def _load_tokenizer(model_dir: ModelDir):  # noqa: ANN202 - a transformers tokenizer or None
    if model_dir.tokenizer_path is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir.tokenizer_path, local_files_only=True)
    except Exception as exc:
        log.warning("cannot load the tokenizer of %s (%s); using byte tokens", model_dir.path, exc)
        return None
