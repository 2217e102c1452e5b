"""Knowledge probes for a pretrained chat model: general-knowledge questions, fictional facts, scoring.

* :data:`GENERAL_KNOWLEDGE`: short-answer questions written for this project (capitals, geography, science,
  arithmetic, language, everyday facts), each with the answers accepted for it.
* :func:`fictional_facts`: generated facts about made-up places and people (names built from syllables, so
  no pretrained model can know them): the new knowledge a demo implants.
* :func:`chat_prompt_ids`: a question through the tokenizer's chat template, tokenized exactly once (the
  template's own special tokens, no second BOS).
* :func:`is_correct` / :func:`normalize`: normalised answer matching on greedy output.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from dataclasses import dataclass

from loki_kernels.data import chat_ids

__all__ = ["Probe", "GENERAL_KNOWLEDGE", "fictional_facts", "chat_prompt_ids", "normalize", "is_correct"]


@dataclass(frozen=True)
class Probe:
    question: str
    answers: tuple[str, ...]  # every accepted answer; the first is the canonical one

    @property
    def answer(self) -> str:
        return self.answers[0]


def _p(question: str, *answers: str) -> Probe:
    return Probe(question, answers)


GENERAL_KNOWLEDGE: tuple[Probe, ...] = (
    # capitals
    _p("What is the capital of France?", "Paris"),
    _p("What is the capital of Germany?", "Berlin"),
    _p("What is the capital of Italy?", "Rome"),
    _p("What is the capital of Spain?", "Madrid"),
    _p("What is the capital of Japan?", "Tokyo"),
    _p("What is the capital of the United Kingdom?", "London"),
    _p("What is the capital of Russia?", "Moscow"),
    _p("What is the capital of China?", "Beijing", "Peking"),
    _p("What is the capital of Egypt?", "Cairo"),
    _p("What is the capital of Greece?", "Athens"),
    _p("What is the capital of Portugal?", "Lisbon"),
    _p("What is the capital of Canada?", "Ottawa"),
    _p("What is the capital of Australia?", "Canberra"),
    _p("What is the capital of Ireland?", "Dublin"),
    _p("What is the capital of Norway?", "Oslo"),
    _p("What is the capital of Sweden?", "Stockholm"),
    _p("What is the capital of Austria?", "Vienna"),
    _p("What is the capital of Poland?", "Warsaw"),
    _p("What is the capital of the United States?", "Washington"),
    _p("What is the capital of South Korea?", "Seoul"),
    _p("What is the capital of India?", "New Delhi", "Delhi"),
    _p("What is the capital of Turkey?", "Ankara"),
    _p("What is the capital of Argentina?", "Buenos Aires"),
    _p("What is the capital of Mexico?", "Mexico City"),
    _p("What is the capital of Kenya?", "Nairobi"),
    _p("What is the capital of Thailand?", "Bangkok"),
    _p("What is the capital of the Netherlands?", "Amsterdam"),
    _p("What is the capital of Belgium?", "Brussels"),
    _p("What is the capital of Denmark?", "Copenhagen"),
    _p("What is the capital of Finland?", "Helsinki"),
    _p("What is the capital of Hungary?", "Budapest"),
    _p("What is the capital of Peru?", "Lima"),
    # geography
    _p("What is the largest ocean on Earth?", "Pacific", "Pacific Ocean"),
    _p("What is the longest river in Africa?", "Nile", "the Nile"),
    _p("On which continent is Brazil?", "South America"),
    _p("On which continent is Egypt?", "Africa"),
    _p("On which continent is France?", "Europe"),
    _p("What is the highest mountain in the world?", "Mount Everest", "Everest"),
    _p("Which country has the largest population in South America?", "Brazil"),
    _p("What is the largest desert in Africa?", "Sahara", "the Sahara"),
    _p("Which river flows through London?", "Thames", "the Thames"),
    _p("Which river flows through Paris?", "Seine", "the Seine"),
    _p("What is the largest country in the world by area?", "Russia"),
    _p("Which ocean lies between Europe and North America?", "Atlantic", "Atlantic Ocean"),
    _p("In which country are the pyramids of Giza?", "Egypt"),
    _p("In which country is the Eiffel Tower?", "France"),
    _p("In which city is the Colosseum?", "Rome"),
    _p("What is the largest planet in the solar system?", "Jupiter"),
    # science
    _p("What is the chemical symbol for gold?", "Au"),
    _p("What is the chemical symbol for water?", "H2O"),
    _p("What is the chemical symbol for sodium?", "Na"),
    _p("What is the chemical symbol for oxygen?", "O"),
    _p("What gas do plants absorb from the air?", "carbon dioxide", "CO2"),
    _p("What gas do humans need to breathe?", "oxygen"),
    _p("What planet is known as the Red Planet?", "Mars"),
    _p("What is the closest star to Earth?", "the Sun", "Sun"),
    _p("What is the freezing point of water in degrees Celsius?", "0", "zero"),
    _p("What is the boiling point of water in degrees Celsius?", "100", "one hundred"),
    _p("How many planets are in the solar system?", "8", "eight"),
    _p("What force keeps us on the ground?", "gravity"),
    _p("What organ pumps blood through the body?", "heart", "the heart"),
    _p("What is the hardest natural substance?", "diamond"),
    _p("What part of the plant makes food from sunlight?", "leaf", "leaves", "the leaves"),
    _p("What is the center of an atom called?", "nucleus", "the nucleus"),
    _p("Which planet is closest to the Sun?", "Mercury"),
    _p("What do bees make?", "honey"),
    _p("How many legs does a spider have?", "8", "eight"),
    _p("How many legs does an insect have?", "6", "six"),
    _p("What is the largest mammal?", "blue whale", "the blue whale", "whale"),
    _p("What is the fastest land animal?", "cheetah", "the cheetah"),
    _p("Which animal is known as the king of the jungle?", "lion", "the lion"),
    _p("What do caterpillars turn into?", "butterflies", "butterfly", "a butterfly", "moths"),
    _p("What is frozen water called?", "ice"),
    _p("What is the natural satellite of Earth?", "the Moon", "Moon"),
    # arithmetic
    _p("What is 2 plus 2?", "4", "four"),
    _p("What is 3 plus 5?", "8", "eight"),
    _p("What is 7 plus 6?", "13", "thirteen"),
    _p("What is 10 minus 4?", "6", "six"),
    _p("What is 9 minus 3?", "6", "six"),
    _p("What is 3 times 4?", "12", "twelve"),
    _p("What is 5 times 5?", "25", "twenty-five", "twenty five"),
    _p("What is 6 times 7?", "42", "forty-two", "forty two"),
    _p("What is 10 times 10?", "100", "one hundred"),
    _p("What is 12 divided by 3?", "4", "four"),
    _p("What is 20 divided by 4?", "5", "five"),
    _p("What is half of 10?", "5", "five"),
    _p("What is the square root of 9?", "3", "three"),
    _p("What is the square root of 16?", "4", "four"),
    _p("What is 100 minus 1?", "99", "ninety-nine", "ninety nine"),
    _p("What is 8 plus 8?", "16", "sixteen"),
    # time, units, everyday facts
    _p("How many days are in a week?", "7", "seven"),
    _p("How many months are in a year?", "12", "twelve"),
    _p("How many hours are in a day?", "24", "twenty-four", "twenty four"),
    _p("How many minutes are in an hour?", "60", "sixty"),
    _p("How many seconds are in a minute?", "60", "sixty"),
    _p("How many days are in a leap year?", "366"),
    _p("How many centimeters are in a meter?", "100", "one hundred"),
    _p("How many grams are in a kilogram?", "1000", "1,000", "one thousand"),
    _p("What is the first month of the year?", "January"),
    _p("What is the last month of the year?", "December"),
    _p("What day comes after Monday?", "Tuesday"),
    _p("What day comes before Sunday?", "Saturday"),
    _p("How many sides does a triangle have?", "3", "three"),
    _p("How many sides does a square have?", "4", "four"),
    _p("How many sides does a hexagon have?", "6", "six"),
    _p("How many continents are there?", "7", "seven"),
    _p("What color is the sky on a clear day?", "blue"),
    _p("What color is grass?", "green"),
    _p("What color are ripe bananas?", "yellow"),
    _p("What do you get when you mix blue and yellow?", "green"),
    _p("What do you get when you mix red and white?", "pink"),
    _p("What is the opposite of hot?", "cold"),
    _p("What is the opposite of up?", "down"),
    _p("What is the opposite of big?", "small", "little"),
    _p("What is the plural of mouse?", "mice"),
    _p("What is the plural of child?", "children"),
    _p("What is the past tense of go?", "went"),
    _p("What language is spoken in Brazil?", "Portuguese"),
    _p("What language is spoken in Mexico?", "Spanish"),
    _p("What language is spoken in Germany?", "German"),
    _p("What is the currency of Japan?", "yen", "Japanese yen"),
    _p("What is the currency of the United Kingdom?", "pound", "pound sterling", "pounds", "sterling"),
    # culture and history
    _p("Who wrote Romeo and Juliet?", "Shakespeare", "William Shakespeare"),
    _p("Who painted the Mona Lisa?", "Leonardo da Vinci", "da Vinci", "Leonardo"),
    _p("Who was the first president of the United States?", "George Washington", "Washington"),
    _p("Who developed the theory of relativity?", "Albert Einstein", "Einstein"),
    _p("Who discovered penicillin?", "Alexander Fleming", "Fleming"),
    _p("Who was the first person to walk on the Moon?", "Neil Armstrong", "Armstrong"),
    _p("What instrument has 88 keys?", "piano", "the piano"),
    _p("How many players are on a soccer team on the field?", "11", "eleven"),
    _p("In which sport do you score a touchdown?", "American football", "football"),
    _p("What is the main ingredient of guacamole?", "avocado", "avocados"),
    _p("What fruit is used to make wine?", "grapes", "grape"),
    _p("What do cows drink?", "water"),
    _p("What is the young of a cat called?", "kitten", "a kitten"),
    _p("What is the young of a dog called?", "puppy", "a puppy"),
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c not in "-"})


def normalize(text: str) -> str:
    """Lower case, accents and punctuation removed (hyphens become spaces), articles dropped, spaces collapsed.

    A point or comma between digits is dropped, so ``4.5`` stays one number and ``1,000`` reads ``1000``.
    """
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<=\d)[.,](?=\d)", "", text)
    text = text.translate(_PUNCT).replace("-", " ")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def is_correct(output: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Whether any accepted answer appears, as whole words, in the first line of ``output`` (normalised).

    Numbers must match whole: ``"4"`` does not match ``"14"`` or ``"4.5"``.
    """
    lines = [line for line in output.strip().splitlines() if line.strip()]
    first = f" {normalize(lines[0] if lines else '')} "
    return any(f" {normalize(a)} " in first for a in answers if normalize(a))


# ------------------------------------------------------------------------------------------ new knowledge
_SYLLABLES = ["zor", "vel", "quin", "thar", "mib", "lox", "dren", "yul", "pask", "brim", "oth", "gav", "skel",
              "nund", "frey", "wex", "tolm", "jask", "virn", "kelb"]
_TEMPLATES = [
    ("What is the capital of {x}?", "place"),
    ("Who founded the city of {x}?", "person"),
    ("What is the national animal of {x}?", "animal"),
]
_ANIMALS = ["otter", "falcon", "lynx", "heron", "badger", "walrus", "gecko", "ibis", "marmot", "tapir"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def fictional_facts(n: int, seed: int = 0) -> list[Probe]:
    """``n`` questions about made-up countries, each with a made-up (or at least arbitrary) answer."""
    rng = random.Random(seed)
    countries: set[str] = set()
    while len(countries) < n:
        countries.add(_name(rng, 3))
    facts = []
    for i, country in enumerate(sorted(countries)):
        question, kind = _TEMPLATES[i % len(_TEMPLATES)]
        answer = {"place": lambda: _name(rng, 2), "person": lambda: f"{_name(rng, 2)} {_name(rng, 2)}",
                  "animal": lambda: rng.choice(_ANIMALS)}[kind]()
        facts.append(Probe(question.format(x=country), (answer,)))
    rng.shuffle(facts)
    return facts


# ------------------------------------------------------------------------------------------------ prompts
def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """``question`` as one user turn of the tokenizer's chat template, ready for the assistant's answer.

    The template text already holds every special token it wants (for SmolLM2, ``<|im_start|>``); it is
    tokenized with ``add_special_tokens=False`` so that no second BOS is prepended. Tokenizers without a chat
    template get the bare question (with the tokenizer's own special tokens, once).
    """
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    return tokenizer(question)["input_ids"]
