"""A varied, deterministic prompt corpus for bench/calibrate.py (generated here: no downloads).

Mixes prose, dialogue, code, numbers and lists, tables, chat-template conversations (with
the model's own system prompt) and odd text (capitals, punctuation, repeated tokens);
each prompt is cut to a log-uniform target length in [min_len, max_len] tokens.
"""

from __future__ import annotations

import math
import random

SUBJECTS = [
    "the old fisherman",
    "a young engineer",
    "my neighbour's cat",
    "the city council",
    "a small robot",
    "the river",
    "our team",
    "the professor",
    "an astronaut",
    "the baker",
    "a flock of geese",
    "the committee",
    "the storm",
    "a quiet student",
    "the market",
]
VERBS = [
    "explained",
    "built",
    "discovered",
    "forgot",
    "painted",
    "measured",
    "carried",
    "sold",
    "repaired",
    "questioned",
    "followed",
    "described",
    "ignored",
    "celebrated",
    "studied",
]
OBJECTS = [
    "a wooden bridge",
    "the new budget",
    "an ancient map",
    "the broken clock",
    "three apples",
    "the theory of relativity",
    "a strange signal",
    "the last train",
    "a recipe for bread",
    "the election results",
    "a list of prime numbers",
    "the castle walls",
    "a blue umbrella",
]
PLACES = [
    "in Paris",
    "near the harbour",
    "at dawn",
    "during the winter",
    "on the moon",
    "in a small village by the sea",
    "inside the library",
    "after the meeting",
    "in 1887",
    "under the bridge",
    "at the top of the mountain",
    "in the laboratory",
]
TOPICS = [
    "photosynthesis",
    "the French revolution",
    "binary search",
    "climate change",
    "how vaccines work",
    "the rules of chess",
    "black holes",
    "compound interest",
    "the water cycle",
    "machine learning",
    "the history of Rome",
    "baking sourdough",
    "recursion",
    "plate tectonics",
    "the immune system",
    "supply and demand",
]
QUESTIONS = [
    "What is {t}?",
    "Can you explain {t} to a child?",
    "Write a short poem about {t}.",
    "Give me three facts about {t}.",
    "Why is {t} important?",
    "Summarise {t} in one line.",
    "What are common mistakes when learning about {t}?",
    "How would you teach {t}?",
]
FUNCS = ["fibonacci", "parse_header", "merge_sorted", "is_prime", "flatten", "word_count"]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?", ";"])


def _prose(rng: random.Random) -> str:
    opener = rng.choice(["Once upon a time, ", "In the morning, ", "", "", "Yesterday, "])
    return opener + " ".join(_sentence(rng) for _ in range(rng.randint(3, 12)))


def _dialogue(rng: random.Random) -> str:
    names = rng.sample(["Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima"], 2)
    lines = [f"{names[i % 2]}: {_sentence(rng)}" for i in range(rng.randint(3, 8))]
    return "\n".join(lines)


def _code(rng: random.Random) -> str:
    f = rng.choice(FUNCS)
    var = rng.choice(["n", "items", "xs", "text", "data"])
    body = [
        f"def {f}({var}):",
        f'    """{rng.choice(TOPICS).capitalize()} helper."""',
        f"    if not {var}:",
        f"        return {rng.choice(['0', 'None', '[]', 'False'])}",
        f"    result = {rng.choice(['[]', '0', '{}'])}",
        f"    for i, x in enumerate({var}):",
        f"        if x % {rng.randint(2, 9)} == {rng.randint(0, 1)}:",
        "            result += x * i",
        "    return result",
        "",
        f"print({f}({list(range(rng.randint(1, 9)))}))",
    ]
    return "\n".join(body)


def _numbers(rng: random.Random) -> str:
    kind = rng.randint(0, 2)
    if kind == 0:
        xs = [rng.randint(-999, 9999) for _ in range(rng.randint(5, 40))]
        return "Sort these numbers: " + ", ".join(map(str, xs))
    if kind == 1:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        return f"Compute {a} * {b} + {a} - {b} step by step. First, {a} * {b} = {a * b}."
    rows = [
        f"| {rng.choice(OBJECTS)} | {rng.randint(1, 99)} | {rng.random():.3f} |"
        for _ in range(rng.randint(2, 8))
    ]
    return "| item | count | ratio |\n| --- | --- | --- |\n" + "\n".join(rows)


def _odd(rng: random.Random) -> str:
    word = rng.choice(["the", "data", "!!", "ok", "🙂", "zzz", "\n"])
    kind = rng.randint(0, 2)
    if kind == 0:
        return (word + " ") * rng.randint(8, 80)
    if kind == 1:
        return _sentence(rng).upper() + " " + _sentence(rng).upper()
    return '{"name": "' + rng.choice(SUBJECTS) + '", "tags": ' + str(rng.sample(TOPICS, 3)) + "}"


def _chat(rng: random.Random, tokenizer) -> list[int]:
    messages = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        q = rng.choice(QUESTIONS).format(t=rng.choice(TOPICS))
        messages.append({"role": "user", "content": q})
        if rng.random() < 0.5:
            messages.append({"role": "assistant", "content": _sentence(rng)})
    if messages[-1]["role"] == "assistant":
        messages.append({"role": "user", "content": "And then?"})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer versions
        ids = ids["input_ids"]
    return list(ids)


def make_prompts(
    tokenizer, n: int, seed: int = 0, min_len: int = 4, max_len: int = 128
) -> list[tuple[str, list[int]]]:
    """n (kind, token ids) pairs with lengths in [min_len, max_len]."""
    rng = random.Random(seed)
    makers = [("prose", _prose), ("dialogue", _dialogue), ("code", _code)]
    makers += [("numbers", _numbers), ("odd", _odd)]
    out = []
    for i in range(n):
        target = round(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
        if i % 4 == 3:  # a quarter chat-template conversations, kept whole when they fit
            kind, ids = "chat", _chat(rng, tokenizer)
        else:
            kind, make = makers[i % len(makers)] if i % 2 else rng.choice(makers)
            text = make(rng)
            while len(tokenizer(text).input_ids) < target:
                text += "\n" + make(rng)
            ids = tokenizer(text).input_ids[:target]
        ids = ids[:max_len]
        if len(ids) < min_len:
            ids = ids + tokenizer(" " + _sentence(rng)).input_ids
            ids = ids[: max(min_len, target)]
        out.append((kind, ids))
    return out
