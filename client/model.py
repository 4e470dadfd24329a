"""DistributedModelForCausalLM: embeddings and LM head local, blocks in the swarm."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import trio
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from trustswarm.models.store import ModelDir
from trustswarm.protocol.evidence import DisagreementReport
from trustswarm.protocol.identity import Identity
from trustswarm.protocol.transport import make_host

from .audits import DEFAULT_AUDIT_RATE, check_audit_rate, make_auditor
from .autograd import RemoteBlocks
from .chained_session import ChainedInferenceSession
from .discovery import DiscoveryBounds
from .generation import (
    GenerationArgumentError,
    SwarmCache,
    SwarmGenerationMixin,
    load_generation_config,
)
from .loop import BackgroundLoop
from .ptune import PromptedSession, SoftPrompt, check_tuning_options
from .redundant_session import RedundantInferenceSession
from .reference import LocalReference
from .sequential import RemotePasses
from .session import InferenceSession
from .swarm import SwarmClient, SwarmView, check_dtype_policy
from .trust import make_trust_view
from .vote_head import VoteHead

log = logging.getLogger("trustswarm.client")


# `logits`, `loss` and (in generate) `past_key_values`: a transformers ModelOutput.
CausalLMOutput = CausalLMOutputWithPast


def check_redundancy(redundancy: int) -> int:
    if isinstance(redundancy, bool) or not isinstance(redundancy, int) or redundancy < 1:
        raise ValueError(f"redundancy must be an integer >= 1, got {redundancy!r}")
    return redundancy


def check_chaining(chaining: bool) -> bool:
    if not isinstance(chaining, bool):
        raise ValueError(f"chaining must be True or False, got {chaining!r}")
    return chaining


def default_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as Hugging Face derives them from a (left-padded) mask."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class DistributedModelForCausalLM(SwarmGenerationMixin, nn.Module):
    """A causal LM whose transformer blocks run on remote servers.

    `forward` follows Hugging Face conventions and `generate` is transformers'
    (`GenerationMixin`, with the swarm's inference session behind the cache: see
    `trustswarm.client.generation`); it works in `pipeline("text-generation")`. The
    network runs in a background thread, so the API is synchronous. Call `close()`
    (or use `with`).
    """

    def __init__(
        self,
        model_dir: ModelDir,
        loop: BackgroundLoop,
        swarm: SwarmClient,
        dtype: torch.dtype = torch.float32,
        *,
        tuning_mode: str | None = None,
        pre_seq_len: int | None = None,
        redundancy: int = 1,
        local_reference: bool = False,
        chaining: bool = True,
    ) -> None:
        super().__init__()
        check_redundancy(redundancy)
        check_chaining(chaining)
        prompt_len = check_tuning_options(tuning_mode, pre_seq_len)
        parts = model_dir.load_client_parts(dtype)
        self.model_dir = model_dir
        self.config = model_dir.config
        self.generation_config = load_generation_config(model_dir.path, model_dir.config)
        self.embed_tokens = parts.embed_tokens
        self.norm = parts.norm
        self.lm_head = parts.lm_head
        self._loop = loop
        self.swarm = swarm
        self.redundancy = redundancy
        self.chaining = chaining
        self.reference = LocalReference(model_dir) if local_reference else None
        self.num_blocks = model_dir.num_blocks
        self.vote_head = VoteHead(self.norm, self.lm_head, self.num_blocks)
        self.passes = RemotePasses(
            swarm, redundancy=redundancy, reference=self.reference, head=self.vote_head
        )
        # Prompt tuning: the only trainable parameters (client parts are frozen).
        self.soft_prompt = SoftPrompt(prompt_len, self.embed_tokens) if prompt_len else None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        initial_peers: Sequence[str],
        *,
        identity: Identity | None = None,
        swarm_key: str | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        trusted_verifiers: Sequence[str] = (),  # peer ids of verifiers whose records count
        min_reputation: float = 0.5,  # skip servers they score below this (or ban)
        dtype: torch.dtype = torch.float32,
        tuning_mode: str | None = None,
        pre_seq_len: int | None = None,
        redundancy: int = 1,
        on_disagreement: Callable[[DisagreementReport], None] | None = None,
        local_reference: bool = False,
        report_disagreements: bool = True,
        dtype_policy: str = "any",
        audit_rate: float = DEFAULT_AUDIT_RATE,
        chaining: bool = True,
    ) -> DistributedModelForCausalLM:
        """Join the swarm at `initial_peers` and run `model_dir`'s model through it.

        redundancy=k: every span of blocks is computed by k servers with distinct
        identities (on distinct hosts when possible) and their answers are compared;
        the client goes on with the value a majority agrees on. Disagreements are
        kept in `trust_events` and passed to `on_disagreement`; outvoted servers are
        not used again by this client. local_reference=True: when replicas do not
        settle a dispute, recompute it with this directory's own block weights.
        trusted_verifiers: peer ids or full multiaddrs of the verifiers whose reputation
        records count; with report_disagreements, each DisagreementReport is sent to
        them (a multiaddr lets the client dial a verifier it is not connected to).
        dtype_policy="float32": route and replicate only through servers that announce
        float32 (answers are then compared with the float32 tolerance everywhere);
        "any" (default) uses bfloat16 servers too. Every answer must be in the dtype its
        server announced, whatever the policy.
        audit_rate: the share of this client's exchanges (each forward/backward answer,
        each hop's inference transcript once its session ends) sent, in the background, to
        the trusted verifiers named by multiaddr to be judged (README, "Audits"). Drawn
        after each answer; 0 turns audits off.
        chaining: with redundancy=1, decode steps pass from server to server and each
        server answers the client directly (one trip along the route instead of a round
        trip per server); every answer is checked as before, and any failure falls back
        to client-driven hops for that step (DESIGN-NOTES, "Chaining").
        """
        check_tuning_options(tuning_mode, pre_seq_len)  # before anything starts
        check_redundancy(redundancy)
        check_dtype_policy(dtype_policy)
        check_audit_rate(audit_rate)
        check_chaining(chaining)
        directory = ModelDir.open(model_dir)
        if not initial_peers:
            raise ValueError("initial_peers must name at least one peer of the swarm")
        identity = identity or Identity.generate()  # fresh identity: unlinkable clients
        # None without trusted verifiers: routing ignores reputation, no pubsub runs.
        trust = make_trust_view(trusted_verifiers, min_reputation, directory.manifest.model_id)
        view = SwarmView(
            model_id=directory.manifest.model_id,
            span_digest=directory.manifest.span_digest,
            request_timeout=request_timeout,
            trust=trust,
            on_disagreement=on_disagreement,
            dtype_policy=dtype_policy,
        )
        swarm = SwarmClient(
            make_host(identity, swarm_key),
            view,
            initial_peers,
            connect_timeout=connect_timeout,
            report_to=list(trusted_verifiers) if report_disagreements else [],
            auditor=make_auditor(trusted_verifiers, audit_rate),
            discovery=DiscoveryBounds(),
        )
        loop = BackgroundLoop()

        async def setup(nursery: trio.Nursery) -> None:
            await nursery.start(swarm.run)

        loop.start(setup)
        try:
            return cls(
                directory,
                loop,
                swarm,
                dtype,
                tuning_mode=tuning_mode,
                pre_seq_len=pre_seq_len,
                redundancy=redundancy,
                local_reference=local_reference,
                chaining=chaining,
            )
        except BaseException:
            loop.close()
            raise

    # -- plumbing -------------------------------------------------------------------

    def run_async(self, fn, *args):  # noqa: ANN001, ANN201 - thin bridge to the loop
        return self._loop.run(fn, *args)

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    # -- forward --------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: SwarmCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        tokenizer: object | None = None,  # generate(stop_strings=..., tokenizer=) passes it on
    ) -> CausalLMOutput:
        """Logits of every token (a plain pass through the swarm, differentiable); with
        `past_key_values` (a SwarmCache, as `generate` passes it) only the new tokens run,
        through the cache's inference session. `use_cache` and `return_dict` are accepted
        for transformers' sake; `logits_to_keep=n` keeps the last n positions' logits."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if past_key_values is not None:
            return self._cached_forward(
                past_key_values, inputs_embeds, attention_mask, position_ids, labels, logits_to_keep
            )
        batch, tokens = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, tokens, dtype=torch.long)
        if position_ids is None:
            position_ids = default_positions(attention_mask)
        prompt_len = 0
        if self.soft_prompt is not None:
            inputs_embeds, attention_mask, position_ids, labels = self.soft_prompt.prepend(
                inputs_embeds, attention_mask, position_ids, labels
            )
            prompt_len = self.soft_prompt.length
        hidden = RemoteBlocks.apply(
            inputs_embeds.float(), self.passes, self, position_ids.long(), attention_mask.long()
        )
        logits = self.lm_head(self.norm(hidden.to(self.norm.weight.dtype))).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        logits = logits[:, prompt_len:]
        return CausalLMOutput(logits=logits[:, -logits_to_keep:], loss=loss)

    def _cached_forward(
        self,
        cache: SwarmCache,
        embeds: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        labels: torch.Tensor | None,
        logits_to_keep: int,
    ) -> CausalLMOutput:
        if not isinstance(cache, SwarmCache):
            raise GenerationArgumentError(
                f"past_key_values must be a SwarmCache (the servers hold the KV cache), "
                f"got {type(cache).__name__}"
            )
        if labels is not None:
            raise GenerationArgumentError("labels cannot be combined with past_key_values")
        rows, new = embeds.shape[:2]
        total = cache.get_seq_length() + new
        if mask is None:
            mask = torch.ones(rows, total, dtype=torch.long)
        if mask.shape != (rows, total):
            raise GenerationArgumentError(
                f"attention_mask must cover the {total} tokens so far, got {list(mask.shape)}"
            )
        if positions is None:
            positions = default_positions(mask)[:, -new:]
        with torch.no_grad():
            hidden = cache.step(embeds, positions, mask.long())
            logits = self.logits_of(hidden[:, -logits_to_keep:])
        return CausalLMOutput(logits=logits, past_key_values=cache)

    # -- inference ------------------------------------------------------------------

    @property
    def trust_events(self) -> list[DisagreementReport]:
        """Disagreements between replicas seen so far, with their signed evidence."""
        return self.swarm.view.trust_events

    def inference_session(
        self, max_length: int, batch_size: int = 1, redundancy: int | None = None
    ) -> SyncInferenceSession | PromptedSession:
        """With a soft prompt, the session prefills it first (max_length excludes it).
        `redundancy` overrides the model's for this session."""
        extra = self.soft_prompt.length if self.soft_prompt is not None else 0
        k = self.redundancy if redundancy is None else check_redundancy(redundancy)
        args = (self.swarm, 0, self.num_blocks, max_length + extra, batch_size)
        plain = ChainedInferenceSession if self.chaining else InferenceSession
        session = (
            plain(*args)
            if k == 1
            else RedundantInferenceSession(
                *args, redundancy=k, reference=self.reference, head=self.vote_head
            )
        )
        try:
            self.run_async(session.open)
        except BaseException:
            self.run_async(session.close)  # replicas opened before the failure
            raise
        sync = SyncInferenceSession(self, session)
        return sync if self.soft_prompt is None else self.soft_prompt.wrap_session(sync)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden.to(self.norm.weight.dtype))).float()


class SyncInferenceSession:
    """Synchronous handle on an InferenceSession; use as a context manager."""

    def __init__(self, model: DistributedModelForCausalLM, session: InferenceSession) -> None:
        self.model = model
        self.session = session

    @property
    def length(self) -> int:
        return self.session.length

    def step(
        self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model.run_async(self.session.step, hidden, positions, mask)

    def close(self) -> None:
        self.model.run_async(self.session.close)

    def __enter__(self) -> SyncInferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
