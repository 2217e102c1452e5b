"""Knowledge probes for a pretrained chat model: scoring, fictional facts, chat-template prompts."""

import random

import pytest

from loki.knowledge import GENERAL_KNOWLEDGE, chat_prompt_ids, fictional_facts, is_correct, normalize
from tests.tiny_models import char_tokenizer


def test_question_set_is_large_and_unique():
    questions = [p.question for p in GENERAL_KNOWLEDGE]
    assert len(questions) >= 100 and len(set(questions)) == len(questions)
    assert all(p.answers and all(normalize(a) for a in p.answers) for p in GENERAL_KNOWLEDGE)


@pytest.mark.parametrize("output, answers, expected", [
    ("Paris", ("Paris",), True),
    ("The capital of France is Paris.", ("Paris",), True),
    ("PARIS!", ("Paris",), True),
    ("Parisian food is great", ("Paris",), False),  # whole words only
    ("It is 14.", ("4", "four"), False),
    ("It is 4.5", ("4",), False),  # a decimal is one number
    ("It is 4.", ("4", "four"), True),
    ("Four.", ("4", "four"), True),
    ("forty-two", ("42", "forty two"), True),
    ("1,000 grams", ("1000",), True),
    ("the Nile", ("Nile",), True),
    ("São Paulo", ("Sao Paulo",), True),  # accents dropped
    ("Berlin\nParis", ("Paris",), False),  # only the first line counts
    ("", ("Paris",), False),
    ("I don't know", ("Paris",), False),
])
def test_is_correct(output, answers, expected):
    assert is_correct(output, answers) is expected


def test_fictional_facts_are_new_unique_and_seeded():
    seed = random.randrange(1 << 30)
    facts = fictional_facts(30, seed=seed)
    assert fictional_facts(30, seed=seed) == facts
    assert len({f.question for f in facts}) == 30
    known = {normalize(a) for p in GENERAL_KNOWLEDGE for a in p.answers} | {normalize(p.question) for p in
                                                                          GENERAL_KNOWLEDGE}
    assert not any(normalize(f.question) in known for f in facts)


def _chat_tokenizer():
    """The char tokenizer with a BOS-adding post-processor and a chat template that starts with BOS itself."""
    from tokenizers import processors

    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}U:{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    return tok


def test_chat_prompt_has_exactly_one_bos():
    tok = _chat_tokenizer()
    naive = tok(tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                        add_generation_prompt=True))["input_ids"]
    assert naive[:2] == [tok.bos_token_id] * 2  # the trap: template BOS + tokenizer BOS
    ids = chat_prompt_ids(tok, "Hi?")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == "U:Hi? A:"


def test_chat_prompt_without_a_template_is_the_bare_question():
    tok = char_tokenizer()
    assert chat_prompt_ids(tok, "Hi?") == tok("Hi?")["input_ids"]
