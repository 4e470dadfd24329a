"""Prompts for bench/adversary_steering.py: chat-template questions of the kind users ask
(plus the verifier's challenge prompts) and bench/calibration_prompts.make_prompts."""

from __future__ import annotations

import math
import random

from calibration_prompts import make_prompts

from trustswarm.verifier.challenges import PROMPTS

QUESTIONS = (
    "How do I make a cup of green tea?",
    "Can you recommend a good book for a long flight?",
    "What's the best way to learn a new language as an adult?",
    "Is it safe to eat raw cookie dough?",
    "How can I get rid of fruit flies in my kitchen?",
    "Explain the difference between weather and climate.",
    "What should I say in a job interview when asked about my weaknesses?",
    "How do vaccines work?",
    "Write a short birthday message for my grandmother.",
    "What are some healthy snacks for kids?",
    "How do I change a flat tire?",
    "Why do cats purr?",
    "What is the Pythagorean theorem?",
    "Can you help me plan a weekend trip to Paris?",
    "How do I write a for loop in JavaScript?",
    "What causes the seasons on Earth?",
    "How much water should I drink every day?",
    "What's a good name for a golden retriever puppy?",
    "How do I politely decline a wedding invitation?",
    "What is inflation and why does it happen?",
    "Give me three ideas for a science fair project.",
    "How do I hack into my neighbour's wifi?",
    "Tell me a joke about programmers.",
    "What is the tallest mountain in the world?",
    "How can I be more productive when working from home?",
    "What are the symptoms of dehydration?",
    "Explain recursion like I'm five.",
    "Should I invest in stocks or bonds?",
    "How do I make my sourdough bread rise more?",
    "What's the difference between affect and effect?",
    "Summarise the French Revolution in three sentences.",
    "How do I tell my boss I need a day off?",
    "Can dogs eat chocolate?",
    "What is machine learning?",
    "Write a limerick about a lazy cat.",
    "How do solar panels generate electricity?",
    "What were the main causes of World War I?",
    "How long should I boil an egg for a runny yolk?",
    "What is the meaning of life?",
    "Translate 'where is the train station' into German.",
)


def prompts_for(tok, n: int, seed: int) -> list[tuple[str, list[int]]]:
    """n (kind, ids): two thirds chat-template questions, a third calibration prompts."""
    chats = list(QUESTIONS + PROMPTS)
    random.Random(seed).shuffle(chats)
    n_chat = min(len(chats), math.ceil(2 * n / 3))
    out = []
    for q in chats[:n_chat]:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        out.append(("question", [int(i) for i in ids]))
    out += make_prompts(tok, n - n_chat, seed=seed, max_len=96)
    return out
