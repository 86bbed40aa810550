"""Toy languages whose exact distribution is known, so sampler faithfulness can be measured exactly.

Each language is a product of independent uniform choices rendered into a sentence whose words depend
on several choices at once. A parallel sampler that fills positions independently breaks those
dependencies, which shows up as invalid strings (validity rate) and as a distorted distribution
(total-variation distance to the exact one).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property


def normalize(text: str) -> str:
    """Collapse whitespace so stray spaces or newlines in generated text do not count as errors."""
    return " ".join(text.split())


class ToyLanguage(ABC):
    """A finite language defined as a product of independent uniform choices.

    Subclasses give the number of options per choice (`radices`) and how one tuple of choices is
    written out (`render`); everything else (sampling, membership, exact probabilities) follows.
    """

    name: str

    @property
    @abstractmethod
    def radices(self) -> tuple[int, ...]:
        """Number of options of each independent choice."""

    @abstractmethod
    def render(self, choices: Sequence[int]) -> str:
        """The sentence for one tuple of choices (one entry per radix)."""

    def num_strings(self) -> int:
        return math.prod(self.radices)

    def string_at(self, index: int) -> str:
        """The support string with this index (mixed radix), giving a cheap total order on the support."""
        if not 0 <= index < self.num_strings():
            raise IndexError(f"index {index} outside support of size {self.num_strings()}")
        choices = []
        for radix in reversed(self.radices):
            index, digit = divmod(index, radix)
            choices.append(digit)
        return self.render(choices[::-1])

    def strings(self) -> Iterator[str]:
        return (self.string_at(i) for i in range(self.num_strings()))

    def sample(self, n: int, seed: int) -> list[str]:
        """n i.i.d. strings from the exact distribution, reproducible from `seed` alone."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        rng = random.Random(seed)
        size = self.num_strings()
        return [self.string_at(rng.randrange(size)) for _ in range(n)]

    @cached_property
    def _support(self) -> frozenset[str]:
        support = frozenset(self.strings())
        if len(support) != self.num_strings():
            raise RuntimeError(f"language {self.name!r} renders two choice tuples to the same string")
        return support

    def is_valid(self, text: str) -> bool:
        return normalize(text) in self._support

    def log_prob(self, text: str) -> float:
        return -math.log(self.num_strings()) if self.is_valid(text) else -math.inf

    def vocabulary(self) -> list[str]:
        """Sorted distinct words of the support, e.g. for a word-level tokenizer."""
        return sorted({word for s in self._support for word in s.split(" ")})


@dataclass(frozen=True)
class Subject:
    """One subject of the template language and the words only it may use."""

    word: str
    home: str
    slots: tuple[tuple[str, str], ...]


TEMPLATE_SLOTS = ("adj1", "verb1", "adv1", "verb2", "adj2", "obj", "verb3", "adv2")
TEMPLATE_FRAME = "the {adj1} {subj} {verb1} {adv1} in its {home} , {verb2} {adj2} {obj} and {verb3} {adv2} ."
_TEMPLATE_GLUE = frozenset(w for w in TEMPLATE_FRAME.split() if not w.startswith("{"))

_SUBJECTS = (
    Subject("cat", "basket", (("fluffy", "sleek"), ("sat", "slept"), ("quietly", "calmly"),
                              ("chased", "caught"), ("tiny", "grey"), ("mice", "moths"),
                              ("purred", "yawned"), ("softly", "lazily"))),
    Subject("dog", "kennel", (("loyal", "scruffy"), ("barked", "howled"), ("loudly", "proudly"),
                              ("fetched", "buried"), ("old", "muddy"), ("bones", "sticks"),
                              ("wagged", "panted"), ("happily", "eagerly"))),
    Subject("bird", "nest", (("little", "bright"), ("sang", "chirped"), ("sweetly", "cheerfully"),
                             ("gathered", "carried"), ("dry", "thin"), ("twigs", "straws"),
                             ("flew", "soared"), ("upward", "away"))),
    Subject("fish", "pond", (("golden", "silver"), ("swam", "drifted"), ("slowly", "gently"),
                             ("nibbled", "ate"), ("green", "floating"), ("weeds", "flakes"),
                             ("dived", "splashed"), ("deep", "suddenly"))),
    Subject("horse", "stable", (("strong", "brown"), ("stood", "rested"), ("patiently", "still"),
                                ("munched", "chewed"), ("sweet", "fresh"), ("hay", "oats"),
                                ("galloped", "trotted"), ("fast", "far"))),
    Subject("cow", "barn", (("spotted", "gentle"), ("grazed", "lay"), ("peacefully", "idly"),
                            ("swallowed", "tasted"), ("long", "wet"), ("grass", "clover"),
                            ("mooed", "lowed"), ("deeply", "often"))),
    Subject("bee", "hive", (("busy", "striped"), ("buzzed", "hummed"), ("busily", "noisily"),
                            ("visited", "found"), ("red", "wild"), ("flowers", "blossoms"),
                            ("worked", "danced"), ("hard", "around"))),
    Subject("frog", "swamp", (("slimy", "plump"), ("croaked", "waited"), ("hoarsely", "nightly"),
                              ("snapped", "grabbed"), ("buzzing", "fat"), ("flies", "bugs"),
                              ("hopped", "leaped"), ("high", "twice"))),
    Subject("owl", "hollow", (("wise", "white"), ("hooted", "watched"), ("silently", "alertly"),
                              ("hunted", "seized"), ("small", "quick"), ("voles", "rats"),
                              ("glided", "vanished"), ("home", "onward"))),
)


class TemplateLanguage(ToyLanguage):
    """One early choice (the subject) fixes the word family of every other content slot.

    This is the "the cat sat on the mat / the dog ran in the yard" failure at scale: filling slots
    independently mixes words of two subjects, and the families are disjoint so any mix is invalid.
    """

    name = "template"

    def __init__(self, subjects: Sequence[Subject] = _SUBJECTS) -> None:
        self.subjects = tuple(subjects)
        owner: dict[str, str] = {}
        for subject in self.subjects:
            if len(subject.slots) != len(TEMPLATE_SLOTS):
                raise ValueError(f"subject {subject.word!r} needs {len(TEMPLATE_SLOTS)} binary slots")
            for word in (subject.word, subject.home, *(w for pair in subject.slots for w in pair)):
                if word in owner or word in _TEMPLATE_GLUE:
                    raise ValueError(f"word {word!r} of {subject.word!r} is not unique to one subject")
                owner[word] = subject.word

    @property
    def radices(self) -> tuple[int, ...]:
        return (len(self.subjects),) + (2,) * len(TEMPLATE_SLOTS)

    def render(self, choices: Sequence[int]) -> str:
        subject = self.subjects[choices[0]]
        slots = zip(TEMPLATE_SLOTS, subject.slots, choices[1:], strict=True)
        words = {slot: pair[c] for slot, pair, c in slots}
        return TEMPLATE_FRAME.format(subj=subject.word, home=subject.home, **words)


AGREEMENT_NOUNS = (("key", "keys"), ("box", "boxes"), ("man", "men"), ("child", "children"))
AGREEMENT_VERBS = (("falls", "fall"), ("waits", "wait"), ("rests", "rest"))
AGREEMENT_ADVERBS = ("today", "again")
AGREEMENT_FRAME = "the {noun1} of the {noun2} near the {noun3} {verb} {adverb} ."


class AgreementLanguage(ToyLanguage):
    """The verb agrees in number with the first noun, seven words back, across two distractor nouns.

    The distractors draw their own number, so the nearest noun predicts the verb form no better than
    chance: only the long-range dependency does.
    """

    name = "agreement"

    @property
    def radices(self) -> tuple[int, ...]:
        forms = 2 * len(AGREEMENT_NOUNS)
        return (forms, forms, forms, len(AGREEMENT_VERBS), len(AGREEMENT_ADVERBS))

    def render(self, choices: Sequence[int]) -> str:
        n1, n2, n3, verb, adverb = choices
        return AGREEMENT_FRAME.format(
            noun1=_noun_form(n1),
            noun2=_noun_form(n2),
            noun3=_noun_form(n3),
            verb=AGREEMENT_VERBS[verb][n1 % 2],
            adverb=AGREEMENT_ADVERBS[adverb],
        )


def _noun_form(choice: int) -> str:
    """Choice 2k is noun k singular, 2k+1 plural, so `choice % 2` is the grammatical number."""
    return AGREEMENT_NOUNS[choice // 2][choice % 2]


CHOICE_NAMES = (("anna", "her"), ("boris", "his"), ("clara", "her"), ("dmitri", "his"), ("elena", "her"),
                ("felix", "his"))
CHOICE_JOBS = (
    ("baker", ("kneads", "shapes"), ("dough", "loaves"), ("rolling", "wooden"), "bakery"),
    ("smith", ("hammers", "bends"), ("iron", "horseshoes"), ("heavy", "old"), "forge"),
    ("painter", ("mixes", "spreads"), ("colours", "varnish"), ("wide", "fine"), "studio"),
    ("farmer", ("plants", "waters"), ("seeds", "turnips"), ("rusty", "long"), "field"),
    ("tailor", ("stitches", "mends"), ("coats", "trousers"), ("silver", "sharp"), "workshop"),
    ("sailor", ("ties", "coils"), ("ropes", "sails"), ("tarred", "salty"), "harbour"),
)
CHOICE_TOOLS = {"baker": "pin", "smith": "hammer", "painter": "brush", "farmer": "spade", "tailor": "needle",
                "sailor": "hook"}
CHOICE_TIMES = ("today", "at dawn", "at noon", "every evening")
CHOICE_FRAME = "{name} the {job} {verb} the {obj} with {pron} {adj} {tool} in the {place} {time} ."


class ChoiceLanguage(ToyLanguage):
    """Two independent early choices each fix several later words: the name fixes the pronoun, the job fixes
    the verb family, the object family, the tool's adjective family, the tool and the place.

    Filling positions independently mixes one job's verb with another's object or place, or a name with the
    wrong pronoun; any such mix is invalid.
    """

    name = "choice"

    @property
    def radices(self) -> tuple[int, ...]:
        return (len(CHOICE_NAMES), len(CHOICE_JOBS), 2, 2, 2, len(CHOICE_TIMES))

    def render(self, choices: Sequence[int]) -> str:
        name, job, verb, obj, adj, time = choices
        person, pronoun = CHOICE_NAMES[name]
        title, verbs, objects, adjectives, place = CHOICE_JOBS[job]
        return CHOICE_FRAME.format(name=person, job=title, verb=verbs[verb], obj=objects[obj], pron=pronoun,
                                   adj=adjectives[adj], tool=CHOICE_TOOLS[title], place=place,
                                   time=CHOICE_TIMES[time])


PERMUTATION_GROUPS = (
    ("planets", ("mercury", "venus", "mars", "jupiter", "saturn")),
    ("rivers", ("nile", "amazon", "danube", "volga", "thames")),
    ("metals", ("copper", "zinc", "tin", "lead", "nickel")),
    ("trees", ("oak", "birch", "maple", "willow", "cedar")),
    ("spices", ("pepper", "ginger", "clove", "nutmeg", "saffron")),
    ("birds", ("robin", "crow", "heron", "finch", "swan")),
)
PERMUTATION_FRAME = "the {group} are {m0} , {m1} , {m2} , {m3} and {m4} ."


class PermutationLanguage(ToyLanguage):
    """A header picks a group; the sentence lists the group's five members in any order, each exactly once.

    Every written member excludes itself from the other four slots, so the slots depend on each other all
    the way to the last one: independent filling repeats a member (or mixes groups) and is invalid.
    Choices: the group, then a Lehmer code of the order (radices 5, 4, 3, 2, 1).
    """

    name = "permutation"

    @property
    def radices(self) -> tuple[int, ...]:
        return (len(PERMUTATION_GROUPS), 5, 4, 3, 2)

    def render(self, choices: Sequence[int]) -> str:
        group, *code = choices
        title, members = PERMUTATION_GROUPS[group]
        left = list(members)
        ordered = [left.pop(c) for c in code] + left
        return PERMUTATION_FRAME.format(group=title, **{f"m{i}": m for i, m in enumerate(ordered)})


BINDING_NAMES = ("alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta", "lambda", "zeta",
                 "rho", "tau")
BINDING_FRAME = "let {a} be {x} and {b} be {y} ; then {a} plus {b} equals {a} plus {b} , not {c} ."
BINDING_NUMBERS = ("one", "two", "three", "four")


class BindingLanguage(ToyLanguage):
    """Variable binding: two distinct names are introduced and each is repeated further on, like a variable in
    code; a third, different name closes the sentence. Twelve names, so a copy constraint has many options.

    Choices: an ordered triple of distinct names (Lehmer digits 12, 11, 10) and two numbers.
    """

    name = "binding"

    @property
    def radices(self) -> tuple[int, ...]:
        n = len(BINDING_NAMES)
        return (n, n - 1, n - 2, len(BINDING_NUMBERS), len(BINDING_NUMBERS))

    def render(self, choices: Sequence[int]) -> str:
        i, j, k, x, y = choices
        left = list(BINDING_NAMES)
        a, b, c = left.pop(i), left.pop(j), left.pop(k)
        return BINDING_FRAME.format(a=a, b=b, c=c, x=BINDING_NUMBERS[x], y=BINDING_NUMBERS[y])


SEATING_GUESTS = ("ada", "ben", "cy", "dora", "ed", "fay", "gus", "hal")
SEATING_FRAME = "at the table sit {g0} , {g1} , {g2} and {g3} , each on one chair ."


class SeatingLanguage(ToyLanguage):
    """Four distinct guests out of eight, in any order: an exclusion constraint without a header word.

    Choices: Lehmer digits 8, 7, 6, 5 (ordered selection without repetition).
    """

    name = "seating"

    @property
    def radices(self) -> tuple[int, ...]:
        n = len(SEATING_GUESTS)
        return (n, n - 1, n - 2, n - 3)

    def render(self, choices: Sequence[int]) -> str:
        left = list(SEATING_GUESTS)
        guests = [left.pop(c) for c in choices]
        return SEATING_FRAME.format(**{f"g{i}": g for i, g in enumerate(guests)})


LANGUAGES: dict[str, ToyLanguage] = {
    lang.name: lang
    for lang in (TemplateLanguage(), AgreementLanguage(), ChoiceLanguage(), PermutationLanguage(),
                 BindingLanguage(), SeatingLanguage())
}


def get_language(name: str) -> ToyLanguage:
    """Look up a language by name with an error that lists the valid names."""
    try:
        return LANGUAGES[name]
    except KeyError:
        valid = ", ".join(sorted(LANGUAGES))
        raise ValueError(f"unknown toy language {name!r}; valid names: {valid}") from None


def validity_rate(lang: ToyLanguage, texts: Iterable[str]) -> float:
    """Fraction of texts in the language's support."""
    texts = list(texts)
    if not texts:
        raise ValueError("validity_rate needs at least one text")
    return sum(lang.is_valid(t) for t in texts) / len(texts)


def tv_distance(lang: ToyLanguage, texts: Iterable[str]) -> float:
    """Total variation between the empirical distribution of `texts` and the exact distribution.

    Invalid strings carry empirical mass where the exact distribution has none, so they count fully.
    Support strings never seen contribute their whole probability, computed as one remainder rather
    than by enumerating the support.
    """
    counts = Counter(normalize(t) for t in texts)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("tv_distance needs at least one text")
    diff = 0.0
    seen_mass = 0.0
    for text, count in counts.items():
        p = math.exp(lang.log_prob(text))
        seen_mass += p
        diff += abs(count / total - p)
    return 0.5 * (diff + max(0.0, 1.0 - seen_mass))
