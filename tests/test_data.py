import ast
import math

import pytest

from jointdlm.cli import main
from jointdlm.data import (
    CORPORA,
    LANGUAGES,
    build_corpus,
    decode_code,
    encode_code,
    get_language,
    read_corpus,
    tv_distance,
    validity_rate,
    write_corpus,
)
from jointdlm.data.toy import TEMPLATE_FRAME


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@pytest.fixture(params=sorted(LANGUAGES))
def lang(request):
    return LANGUAGES[request.param]


def test_samples_are_valid_and_seeded(lang):
    samples = lang.sample(500, seed=3)
    assert all(lang.is_valid(s) for s in samples)
    assert validity_rate(lang, samples) == 1.0
    assert samples == lang.sample(500, seed=3)
    assert samples != lang.sample(500, seed=4)


def test_support_is_exact_distribution(lang):
    support = list(lang.strings())
    assert len(support) == len(set(support)) == lang.num_strings()
    assert 500 <= lang.num_strings() <= 25_000
    assert all(len(s.split()) <= 22 for s in support)
    assert logsumexp([lang.log_prob(s) for s in support]) == pytest.approx(0.0, abs=1e-9)
    assert tv_distance(lang, support) == pytest.approx(0.0, abs=1e-9)


def test_words_are_plain_lowercase(lang):
    assert all(w in {",", ".", ";"} or (w.isascii() and w.isalpha() and w.islower()) for w in lang.vocabulary())


def test_validity_normalises_whitespace(lang):
    text = lang.sample(1, seed=0)[0]
    assert lang.is_valid("  " + text.replace(" ", "  \n") + " ")
    assert not lang.is_valid(text.replace(" ", ""))
    assert lang.log_prob("not a sentence") == -math.inf


def test_template_shape():
    lang = get_language("template")
    assert lang.num_strings() == 2304 == len(list(lang.strings()))
    assert all(len(s.split(" ")) == 16 for s in lang.strings())
    assert lang.log_prob(lang.string_at(0)) == pytest.approx(-math.log(2304))
    assert len(lang.vocabulary()) <= 180
    assert len(TEMPLATE_FRAME.split()) == 16


def test_template_rejects_mixed_subjects_and_swaps():
    lang = get_language("template")
    cat = lang.render([0] * 9).split()
    dog = lang.render([1] + [0] * 8).split()
    assert cat[2] == "cat" and dog[2] == "dog"
    assert lang.is_valid(" ".join(cat)) and lang.is_valid(" ".join(dog))
    for i, (a, b) in enumerate(zip(cat, dog, strict=True)):
        if a != b:
            mixed = cat[:i] + [b] + cat[i + 1 :]
            assert not lang.is_valid(" ".join(mixed)), mixed
    swapped = cat.copy()
    swapped[3], swapped[4] = swapped[4], swapped[3]
    assert not lang.is_valid(" ".join(swapped))
    assert not lang.is_valid(" ".join(cat[:8] + dog[8:]))


def test_template_subject_families_are_disjoint():
    lang = get_language("template")
    sentences = [s.split() for s in lang.strings()]
    words = [{w for s in sentences if s[2] == subj.word for w in s} for subj in lang.subjects]
    glue = set.intersection(*words)
    assert glue == {"the", "in", "its", ",", "and", "."}
    for i in range(len(words)):
        for j in range(i + 1, len(words)):
            assert words[i] & words[j] == glue


def test_agreement_requires_long_range_number_agreement():
    lang = get_language("agreement")
    good = "the keys of the man near the child fall again ."
    assert lang.is_valid(good)
    assert not lang.is_valid("the keys of the man near the child falls again .")
    assert not lang.is_valid("the key of the men near the children fall again .")
    assert lang.is_valid("the key of the men near the children falls again .")
    assert not lang.is_valid("the keys of the man near the child again fall .")


def test_tv_distance_bounds():
    lang = get_language("template")
    # 20000 draws over 2304 equiprobable strings: E[TV] ~ 0.136, spread across seeds ~0.003.
    assert tv_distance(lang, lang.sample(20000, seed=0)) < 0.16
    assert tv_distance(lang, ["the cat", "nonsense words", "the dog sat"]) == 1.0
    cats_only = [s for s in lang.strings() if s.split()[2] == "cat"]
    assert tv_distance(lang, cats_only) == pytest.approx(8 / 9)
    assert validity_rate(lang, cats_only + ["x"] * len(cats_only)) == 0.5
    with pytest.raises(ValueError):
        tv_distance(lang, [])


def test_toy_corpus_round_trip(tmp_path):
    path = tmp_path / "sub" / "template.txt"
    assert write_corpus("template", path, num=300, seed=5) == 300
    docs = read_corpus(path)
    assert docs == get_language("template").sample(300, seed=5)
    assert write_corpus("agreement", path, num=10) == 10
    assert len(read_corpus(path)) == 10
    assert [p.name for p in path.parent.iterdir()] == ["template.txt"]


def test_english_corpus(tmp_path, capsys):
    docs = build_corpus("english")
    assert len(docs) > 2000
    assert len(set(docs)) == len(docs)
    assert all(d.isascii() and "\n" not in d and 20 <= len(d) <= 300 and ">>>" not in d for d in docs)
    assert build_corpus("english", num=50, seed=1) == build_corpus("english", num=50, seed=1)
    assert build_corpus("english", num=50, seed=1) != build_corpus("english", num=50, seed=2)
    path = tmp_path / "english.txt"
    assert write_corpus("english", path, num=100) == 100
    assert read_corpus(path) == build_corpus("english", num=100)
    # Asking for more documents than there are writes them all and says so.
    assert main(["corpus", "english", "--out", str(path), "--num", str(len(docs) + 5)]) == 0
    assert f"wrote {len(docs)} documents to {path} (all there are; --num asked for {len(docs) + 5})" in \
        capsys.readouterr().err
    assert read_corpus(path) == build_corpus("english")


def test_code_corpus(tmp_path):
    docs = build_corpus("code")
    assert len(docs) > 500
    assert all("\n" not in d and "\t" not in d for d in docs)
    decoded = [decode_code(d) for d in docs]
    assert all(3 <= len(c.split("\n")) <= 25 and len(c) <= 800 for c in decoded)
    parsed = 0
    for code in decoded:
        try:
            ast.parse(code)
            parsed += 1
        except SyntaxError:
            pass
    assert parsed > 0.9 * len(docs)
    path = tmp_path / "code.txt"
    write_corpus("code", path, num=200, seed=7)
    assert read_corpus(path) == build_corpus("code", num=200, seed=7)


def test_code_encoding_round_trip():
    text = "def f(x):\n\treturn x\n"
    assert decode_code(encode_code(text)) == "def f(x):\n    return x\n"
    assert "\n" not in encode_code(text)


def test_corpus_errors(tmp_path):
    assert set(CORPORA) == {*LANGUAGES, "english", "code", "tasks"} and len(LANGUAGES) == 6
    with pytest.raises(ValueError, match="valid names"):
        write_corpus("klingon", tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no documents"):
        write_corpus("template", tmp_path / "x.txt", num=0)
    assert not (tmp_path / "x.txt").exists()
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        read_corpus(empty)
    with pytest.raises(ValueError, match="valid names"):
        get_language("klingon")


def test_choice_and_permutation_languages_encode_their_dependencies():
    choice, permutation = get_language("choice"), get_language("permutation")
    good = "anna the baker kneads the dough with her rolling pin in the bakery at dawn ."
    assert choice.is_valid(good)
    assert not choice.is_valid(good.replace("her", "his"))            # the name fixes the pronoun
    assert not choice.is_valid(good.replace("bakery", "forge"))       # the job fixes the place
    assert not choice.is_valid(good.replace("at dawn", "every dawn"))  # the time is one of four phrases
    listed = "the planets are venus , mars , mercury , saturn and jupiter ."
    assert permutation.is_valid(listed)
    assert not permutation.is_valid(listed.replace("venus", "mars"))  # each member once
    assert not permutation.is_valid(listed.replace("venus", "oak"))   # members of the header's group only
    assert permutation.num_strings() == 6 * 120
    seating = get_language("seating")
    assert seating.num_strings() == 8 * 7 * 6 * 5
    assert not seating.is_valid("at the table sit ada , ada , ben and cy , each on one chair .")
    binding = get_language("binding")
    text = binding.sample(1, seed=0)[0].split()
    assert text[1] == text[10] == text[14] and text[5] == text[12] == text[16] and text[-2] not in (text[1], text[5])
