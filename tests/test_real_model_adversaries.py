"""The optimizing adversaries of issue 10 on the real SmolLM2, where the numbers matter:
framing inputs the searches found leave honest servers unpunished; steering that the old
rule (hidden-state comparator only) let through is called wrong by the verifier's judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trustswarm.demo import chat_ids
from trustswarm.models.runner import BlockRunner
from trustswarm.models.store import ModelDir
from trustswarm.protocol.comparator import compare
from trustswarm.protocol.evidence import DisagreementReport
from trustswarm.testing.offline_judge import OfflineJudge
from trustswarm.testing.steering import (
    ModelDownstream,
    announced_tolerance,
    comparator_accept,
    runner_up,
    steer_last_token,
)

pytestmark = pytest.mark.timeout(600)
FRAMING = Path(__file__).parent / "data" / "framing_smollm2_20_30.json"
SPAN = (20, 30)


@pytest.fixture(scope="module")
def real(real_model_dir: Path):
    torch.set_num_threads(1)
    md = ModelDir.open(real_model_dir)
    full = BlockRunner(md, 0, md.num_blocks, torch.float32)
    parts = md.load_client_parts(torch.float32)
    bf16 = BlockRunner(md, *SPAN, torch.bfloat16)
    return md, full, parts, bf16, OfflineJudge(md, full, parts)


def test_framing_inputs_found_on_smollm2_ban_no_honest_server(real):
    """Before issue 10, the bf16-error input got an honest bfloat16 server banned."""
    md, full, _, bf16, judge = real
    for item in json.loads(FRAMING.read_text())["inputs"]:
        x = torch.tensor(item["hidden"]).reshape(1, 1, -1)
        with torch.inference_mode():
            fp = full.forward(x, None, None, *SPAN)
            bf = bf16.forward(x, None, None, *SPAN)
        # The input is adversarial: honest answers disagree far beyond the tolerance.
        assert not compare(bf, fp).agree, item["objective"]
        for output in (fp, bf):
            verdict = judge.judged(SPAN, x, output)
            assert not verdict.proven and not verdict.wrong, (item["objective"], verdict)


def test_steering_the_old_rule_allowed_is_caught_by_the_judge(real, real_model_dir):
    """A bfloat16 server steers the last row toward the runner-up token inside the
    hidden-state comparator (the only check before issue 10); the verifier's next-token
    rule calls it wrong."""
    _, full, parts, bf16, judge = real
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    ids = chat_ids(tok, "Name a colour of the sky on a clear day.")
    with torch.inference_mode():
        x = full.forward(parts.embed_tokens(ids).float(), None, None, 0, SPAN[0])
        ref = full.forward(x, None, None, *SPAN)
        honest = bf16.forward(x, None, None, *SPAN)
    down = ModelDownstream(parts, None, None, None, SPAN[1], SPAN[1])
    logits = down(ref)
    assert int(down(honest.float()).argmax()) == int(logits.argmax())  # no honest flip
    assert not judge.judged(SPAN, x, honest).wrong  # the honest answer passes
    target = runner_up(logits)
    old_rule = comparator_accept(
        [ref], announced_tolerance(torch.bfloat16), extra=comparator_accept([honest])
    )
    res = steer_last_token(
        honest, target, down, old_rule, 12, tolerance=announced_tolerance(torch.bfloat16)
    )
    assert res.reached and res.accepted  # the attack works against the old rule
    assert compare(res.output, ref).agree and compare(res.output, honest).agree
    verdict = judge.judged(SPAN, x, res.output)
    assert verdict.wrong, verdict


HONEST_BF16_SESSION = Path(__file__).parent / "data" / "honest_bf16_session_0_15.report"


def test_honest_bfloat16_session_with_an_ill_conditioned_step_passes(real):
    """A real audit transcript of an honest bfloat16 server on 0:15 (greedy decode of
    "Why is the sky blue?" at redundancy 2): one decode step has an ill-conditioned token,
    which the judge replaces with the reference. The same-dtype replay must get the same
    replacement, or it does not reproduce the honest answer and the next-token check
    failed it (margin 0.054 > 0.05; 3 of 785 honest audits in bench/audits_honest.py)."""
    report = DisagreementReport.from_bytes(HONEST_BF16_SESSION.read_bytes())
    evidence = report.answers[0].evidence
    judgement = real[4].judge.judge(evidence)
    assert judgement.steps == 12
    assert not judgement.wrong, judgement.reason
