"""Tests for support/world.py: the lexicons, the world and its questions, splits, demonstrations,
the tokenizer corpus, and world.load_examples (world names here, everything else through
support/loaders.py)."""
import json
import re
from collections import Counter

import pytest

from support import loaders, world
from support.data import Demo, Example, format_error, reward, tool_counts
from support.loaders import load_demos, save_jsonl
from support.world import build_world, demonstrations, load_examples, world_questions, world_splits


# ----------------------------------------------------------------------------------- built-in world
def test_lexicons_are_distinct_short_invented_words():
    words = world.FIRST_NAMES + world.LAST_NAMES + world.CITIES + world.COUNTRIES + world.COMPANIES
    assert len(words) == len(set(words))
    assert all(re.fullmatch(r"[A-Z][a-z]{3,5}", w) for w in words)


def test_world_is_deterministic_and_sized():
    world = build_world(3)
    assert world.docs == build_world(3).docs and world.docs != build_world(4).docs
    assert (len(world.people), len(world.cities), len(world.countries),
            len(world.companies)) == (200, 40, 10, 40)
    assert len(world.docs) == 290 and len({d["id"] for d in world.docs}) == 290
    assert len({p.name for p in world.people}) == 200
    assert all(1900 <= p.birth_year <= 1999 for p in world.people)
    assert all(1900 <= c.founded <= 1999 for c in world.companies)
    assert set(world.cities.values()) == set(world.countries)  # every country has a city
    # one or two sentences
    assert all(len(re.split(r"(?<=\.) ", d["text"])) <= 2 for d in world.docs)


def test_every_world_question_is_answerable_from_the_docs():
    world = build_world(0)
    text = {d["title"]: d["text"] for d in world.docs}
    questions = world_questions(world)
    assert Counter(q.kind for q in questions) == {"1hop": 600, "2hop": 80, "math": 100}
    for q in questions:
        gold = q.golds[0]
        if m := re.fullmatch(r"(?:Where was|In which year was|Which company does) (\w+ \w+) "
                             r"(?:born|work for)\?", q.question):
            assert gold in text[m[1]]
        elif m := re.fullmatch(r"In which country was the founder of (\w+) born\?", q.question):
            founder = re.search(r"by (\w+ \w+)\.", text[m[1]])[1]
            assert f"a city in {gold}." in text[founder]
        elif m := re.fullmatch(r"In which country are the headquarters of (\w+)\?", q.question):
            city = re.search(r"headquarters in (\w+)\.", text[m[1]])[1]
            assert text[city] == f"{city} is a city in {gold}."
        else:
            x, z = re.fullmatch(r"How many years older is (\w+ \w+) than (\w+ \w+)\?",
                                q.question).groups()
            year = lambda name: int(re.search(r"born in (\d{4})", text[name])[1])
            assert int(gold) == year(z) - year(x) > 0


def test_world_splits_are_disjoint_by_subject():
    train, heldout = world_splits(0, n_heldout=150)
    assert len(heldout) == 150 and len(train) > 500
    assert ({q.source for q in train} == {"world:train"}
            and {q.source for q in heldout} == {"world:heldout"})
    assert set(Counter(q.kind for q in heldout)) == {"1hop", "2hop", "math"}
    assert not {q.question for q in train} & {q.question for q in heldout}
    world = build_world(0)
    founder = {c.name: c.founder for c in world.companies}
    names = re.compile("|".join([p.name for p in world.people] + list(founder)))

    # people and companies a question names, plus the founder a 2-hop needs
    def subjects(questions):
        found = {n for q in questions for n in names.findall(q.question)}
        return found | {founder[n] for n in found if n in founder}

    assert not subjects(train) & subjects(heldout)
    assert world_splits(0) == (train, heldout)


# ----------------------------------------------------------------------------------- demonstrations
def fake_search(docs):
    def search(query, top_k):
        hits = [d for d in docs if d["title"] in query][:top_k]
        return "\n".join(f"Page {i}: {d['text']}" for i, d in enumerate(hits, 1))
    return search


def test_demonstrations():
    demos = demonstrations(60, seed=1, make_search=fake_search)
    assert demos == demonstrations(60, seed=1, make_search=fake_search)
    quality = Counter(d.quality for d in demos)
    assert quality["good"] == 60 - round(60 * 0.4)
    assert set(quality) == {"good", "no_search", "wasted_search", "guessed_math"}
    assert {d.kind for d in demos} == {"1hop", "2hop", "math"}
    assert len({d.question for d in demos}) == 60  # a fresh world each: names recombine
    for d in demos:
        assert format_error(d.response) is None, d.response
        # content starts with a space
        assert re.search(r"<(search|python)>(?! )|\\boxed\{(?! )", d.response) is None
        searches, pythons = tool_counts(d.response)
        r = reward(d.response, d.golds)
        if d.quality == "good":
            assert r == pytest.approx(1.1 if d.kind == "math" else 1.0), d.response
            assert (searches == {"1hop": 1, "2hop": 2, "math": 2}[d.kind]
                    and pythons == (d.kind == "math"))
        elif d.quality == "no_search":
            assert searches == pythons == 0
        elif d.quality == "wasted_search":
            assert r >= 1.0 and searches == {"1hop": 2, "2hop": 3, "math": 3}[d.kind]
        else:
            assert d.kind == "math" and searches == 2 and pythons == 0 and r == 0.0
    assert (sum(reward(d.response, d.golds) for d in demos if d.quality == "no_search")
            < quality["no_search"] / 2)


def test_math_demo_reads_like_the_template():
    demo = next(d for d in demonstrations(30, 2, fake_search)
                if d.kind == "math" and d.quality == "good")
    old, young = re.fullmatch(r"How many years older is (\w+ \w+) than (\w+ \w+)\?",
                              demo.question).groups()
    years = re.search(r"<python> (\d{4}) - (\d{4}) </python> <result>\n(\d+)\n</result>",
                      demo.response).groups()
    assert int(years[0]) - int(years[1]) == int(years[2]) == int(demo.golds[0])
    assert demo.response.endswith(f"<answer> The final answer is \\boxed{{ {demo.golds[0]}}} "
                                  "</answer>")
    assert demo.response.startswith(f"<think> I need to find the years {old} and {young} were "
                                    "born. </think>")


def test_tokenizer_corpus_covers_names_numbers_and_demos():
    texts = list(world.tokenizer_corpus(seed=0, n_demos=10))
    assert all(isinstance(t, str) for t in texts)
    words = Counter(w for t in texts for w in re.findall(r"\w+", t))
    for w in (world.FIRST_NAMES + world.LAST_NAMES + world.CITIES + world.COUNTRIES
              + world.COMPANIES):
        assert words[w] >= 20
    assert all(words[str(v)] >= 20 for v in [*range(121), *range(1900, 2000)])
    assert sum(t.startswith("<think>") for t in texts) == 10  # the demonstrations


# ------------------------------------------------------------------------------ world.load_examples
def test_world_specs():
    train, heldout = world_splits(0)
    assert load_examples("world") == load_examples("world:train") == train
    assert load_examples("world:heldout", limit=7) == heldout[:7]
    with pytest.raises(ValueError, match="unknown world split 'world:test'"):
        load_examples("world:test")
    with pytest.raises(ValueError, match="limit must be a positive number"):
        load_examples("world:heldout", limit=0)


def test_other_names_go_to_loaders_which_know_no_world(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert (load_examples(str(path)) == loaders.load_examples(str(path))
            == [Example("q", ("a",), "mine")])
    with pytest.raises(ValueError, match="unknown data 'world:heldout'"):
        loaders.load_examples("world:heldout")
    assert world.Demo is Demo


def test_demos_round_trip(tmp_path):
    demos = demonstrations(5, seed=3, make_search=fake_search)
    save_jsonl(demos, tmp_path / "sub" / "demos.jsonl")
    assert load_demos(tmp_path / "sub" / "demos.jsonl") == demos
