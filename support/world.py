"""The built-in world: a fictional encyclopedia, its questions, and cold-start SFT demonstrations
(the tiny policy trained on its text is tiny.py).

In and out:
- `build_world(seed)` makes a fictional encyclopedia (200 people, 40 cities, 10 countries, 40
  companies, one short document each) whose questions cannot be answered without searching.
  `world_splits` splits its questions (`data.Example`s) by subject; `world_corpus` gives the
  documents to search.
- `demonstrations(n, seed, make_search)` writes cold-start SFT trajectories (`data.Demo`s) in the
  exact AEPO format, each in a fresh random world; `tokenizer_corpus()` yields text for training a
  tiny BPE tokenizer.
- `load_examples(spec)` is the dataset entry point of train.py, eval.py and the benchmarks: it
  answers "world" (= "world:train") and "world:heldout" itself and passes every other name
  (a file, a hub id) to `loaders.load_examples`, which knows no particular world.

Example:
    python -m support.world   # split sizes, a few questions, three demonstrations

Decisions worth knowing:
1. Content spans start with a space (`<search> Mirel Quell </search>`, `\\boxed{ Vantor}`), so a
   name has the same token ids in question, query, document and answer.
2. World questions: three 1-hop kinds, two 2-hop kinds (the founder's country and, beyond the spec,
   the headquarters' country, so held-out sets have enough 2-hop questions) and one arithmetic kind.
"""
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from support import loaders
from support.data import SHORT_SYSTEM_PROMPT, SYSTEM_PROMPT, Demo, Example

# ----------------------------------------------------------------------------------- built-in world
# Invented one-word names, distinct across lexicons. Every world recombines the same words, so a
# model cannot memorise who is who and must copy names from the question and the search results.
FIRST_NAMES = """Abrin Belio Corva Davek Elvra Fenno Galim Hessa Idrin Jorun Kavel Lumra Mirel Nadro
Ossia Pelio Quila Ravon Selka Tovan Ulvin Vessa Wenlo Xamir Yorra Zelin Aldun Brisel Cavio Dorla
Emrin Faelo Gidra Halvo Isvar Jelvo Kirso Lunka Morva Nilsa Orlek Pavra Quoro Rilda Soveg Tamsi
Ursel Velko Wimra Yasko Zurev Adeno Bovik Celva Dunra Ezmel Farok Gelsi Hovra Ilsem""".split()
LAST_NAMES = """Quell Brask Dorvik Falst Grenn Hulvek Jarsk Kestor Lomvik Marrek Nurst Pelloc Quarn
Ruskel Stavik Tolbek Ulmark Wexdal Yarrik Zolsk Arvek Corbek Dunmal Eskrid Fornak Gulbek Harnst
Iskold Jorvek Kolbek Lestum Morvik Nolbra Prask Ridolt Sarnek Tullen Vaskel Welmot Zandt Abbrel
Belnik Crusk Drennt Elbask Fjorn Gastel Holmek Irnvik Jostel Klaven Lurnst Mersk Nostek Orbek Plensk
Rask Sturl Trevik Vorrel""".split()
CITIES = """Vantor Belmut Carvis Dunmor Eskvar Falrun Gorvan Halmun Istrad Jorlin Kelvar Lorvek
Mardun Nessor Orvath Pelmor Quidra Rastun Solvey Tarnis Umbrek Velmar Wisrun Yarvos Zandor Almuth
Brevon Cresk Delvos Ermath Fenvor Glimor Harvik Ilmon Jastor Kervis Lunmar Morvat Nardis Olvin
Presun Quenar Rovath Sulmor Tavrek Undris Vessar Wendol Yskar Zorvan Ambrel Berrun Culdor Dravis
Estmar Fornis Gavrun Hestor Irvath Jundar""".split()
COUNTRIES = """Delvar Aurvia Bostia Caldia Eskria Fenria Galdia Hesvia Ilvria Jorria Kestia Lumria
Morvia Norvia Ostvia Parnia""".split()
COMPANIES = """Ostrel Axiron Bexel Corvex Dynaro Elvix Fyntel Galdex Hexor Ivrel Jextra Kynox Lumex
Mynto Nexil Obrix Pyxor Qantel Rexon Syntal Tyvon Ultrix Vexal Wyntel Xerel Yvex Zentix Alvex Brotel
Cyrel Daxel Emtrix Folex Gyntro Halvex Intrel Jorvex Kaltix Lyvon Moxel Nytrex Ovix Plexar Qorvel
Rynex Strevo Torvex Umbrix Valtix Wexon Xylar Yantel Zorvex Arktel Bryvon Calnex Dexil Exonar Fyxel
Grinel""".split()


@dataclass(frozen=True)
class Person:
    name: str  # first name + last name, e.g. "Mirel Quell"
    birth_year: int
    birth_city: str
    employer: str  # a company


@dataclass(frozen=True)
class Company:
    name: str
    founder: str  # a person, who also works there
    headquarters: str  # a city
    founded: int


@dataclass
class World:
    seed: int
    people: list[Person]  # consecutive pairs (0, 1), (2, 3), ... are compared by the math questions
    cities: dict[str, str]  # city -> the country it lies in
    countries: list[str]
    companies: list[Company]
    docs: list[dict]  # {"id", "title", "text"}, one per entity: the search corpus


def build_world(seed: int, n_people: int = 200, n_cities: int = 40, n_countries: int = 10,
                n_companies: int = 40) -> World:
    """A deterministic fictional encyclopedia; every fact in it is random given the seed."""
    rng = random.Random(seed)
    countries = rng.sample(COUNTRIES, n_countries)
    city_names = rng.sample(CITIES, n_cities)
    cities = {c: countries[i] if i < n_countries else rng.choice(countries)
              for i, c in enumerate(city_names)}
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES],
                       n_people)
    years: list[int] = []
    # the two people of a pair differ in age, so "how many years older" is positive
    for i in range(n_people):
        years.append(rng.randint(1900, 1999))
        while i % 2 and years[-1] == years[-2]:
            years[-1] = rng.randint(1900, 1999)
    company_names = rng.sample(COMPANIES, n_companies)
    older_half = sorted(range(n_people), key=years.__getitem__)[: max(n_people // 2, n_companies)]
    # company -> person index
    founder = dict(zip(company_names, rng.sample(older_half, n_companies)))
    founded_by = {i: company for company, i in founder.items()}
    people = [Person(names[i], years[i], rng.choice(city_names),
                     founded_by.get(i) or rng.choice(company_names))
              for i in range(n_people)]
    companies = [Company(c, names[i], rng.choice(city_names),
                         min(years[i] + rng.randint(20, 40), 1999))
                 for c, i in founder.items()]
    texts = [f"{p.name} was born in {p.birth_year} in {p.birth_city}, a city in "
             f"{cities[p.birth_city]}. {p.name} works for {p.employer}." for p in people]
    texts += [f"{c.name} is a company founded in {c.founded} by {c.founder}. "
              f"{c.name} has its headquarters in {c.headquarters}." for c in companies]
    texts += [f"{city} is a city in {country}." for city, country in cities.items()]
    texts += [f"{k} is a country with the cities "
              f"{', '.join(c for c in city_names if cities[c] == k)}."
              for k in countries]
    titles = [p.name for p in people] + [c.name for c in companies] + city_names + countries
    docs = [{"id": f"{seed}-{i}", "title": title, "text": text}
            for i, (title, text) in enumerate(zip(titles, texts))]
    return World(seed, people, cities, countries, companies, docs)


# Question templates, shared by the world's questions and the demonstrations so their wording is
# identical.
ONE_HOP = {  # Person attribute -> (question, what the agent looks for, what the document says)
    "birth_city": ("Where was {x} born?", "where {x} was born", "{x} was born in {a}"),
    "birth_year": ("In which year was {x} born?", "the year {x} was born", "{x} was born in {a}"),
    "employer": ("Which company does {x} work for?", "the company {x} works for",
                 "{x} works for {a}"),
}
FOUNDER_COUNTRY = "In which country was the founder of {y} born?"
HEADQUARTERS_COUNTRY = "In which country are the headquarters of {y}?"
YEARS_OLDER = "How many years older is {x} than {z}?"


def _world_items(world: World) -> list[tuple[Example, int]]:
    """Every question with its unit: the pair of people it is about (a company belongs to its
    founder's)."""
    unit = {p.name: i // 2 for i, p in enumerate(world.people)}
    birth = {p.name: p for p in world.people}
    items = [(Example(q.format(x=p.name), (str(getattr(p, attr)),), "world", "1hop"), unit[p.name])
             for p in world.people for attr, (q, _, _) in ONE_HOP.items()]
    for c in world.companies:
        founder_country = world.cities[birth[c.founder].birth_city]
        items.append((Example(FOUNDER_COUNTRY.format(y=c.name), (founder_country,),
                              "world", "2hop"), unit[c.founder]))
        hq_country = world.cities[c.headquarters]
        items.append((Example(HEADQUARTERS_COUNTRY.format(y=c.name), (hq_country,),
                              "world", "2hop"), unit[c.founder]))
    for a, b in zip(world.people[::2], world.people[1::2]):
        old, young = sorted((a, b), key=lambda p: p.birth_year)
        gold = str(young.birth_year - old.birth_year)
        items.append((Example(YEARS_OLDER.format(x=old.name, z=young.name), (gold,),
                              "world", "math"), unit[a.name]))
    return items


def world_questions(world: World) -> list[Example]:
    """All questions about a world: 3 per person, 2 per company, 1 per pair of people."""
    return [example for example, _ in _world_items(world)]


def world_splits(seed: int = 0, n_heldout: int = 150) -> tuple[list[Example], list[Example]]:
    """(train, heldout) questions of world `seed`; no held-out subject is the subject of a train
    question."""
    items = _world_items(build_world(seed))
    rng = random.Random(f"{seed}:split")
    units = sorted({u for _, u in items})
    rng.shuffle(units)
    held, count = set(), 0
    for u in units:  # hold out whole units until they cover n_heldout questions
        if count >= n_heldout:
            break
        held.add(u)
        count += sum(1 for _, v in items if v == u)
    if len(held) == len(units):
        raise ValueError(f"n_heldout={n_heldout} leaves no training question (the world has "
                         f"{len(items)})")
    rank = {u: i for i, u in enumerate(units)}
    heldout = [ex for ex, u in sorted((it for it in items if it[1] in held),
                                      key=lambda it: rank[it[1]])][:n_heldout]
    train = [ex for ex, u in items if u not in held]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return ([replace(ex, source="world:train") for ex in train],
            [replace(ex, source="world:heldout") for ex in heldout])


def world_corpus(seed: int = 0) -> list[dict]:
    """The documents of world `seed`: the corpus the search tool indexes."""
    return build_world(seed).docs


WORLD_SPECS = ("world", "world:train", "world:heldout")  # "world" is world:train


def load_examples(spec: str, limit: int | None = None) -> list[Example]:
    """Questions of a dataset name: world, world:train or world:heldout (world 0) here; a .parquet
    or .jsonl file or a hub id through loaders.load_examples."""
    spec = str(spec)
    if spec != "world" and not spec.startswith("world:"):
        return loaders.load_examples(spec, limit)
    if spec not in WORLD_SPECS:
        raise ValueError(f"unknown world split {spec!r}: use world (= world:train), world:train or "
                         "world:heldout")
    loaders.head([], limit)  # a bad limit fails before the world is built
    train, heldout = world_splits(0)
    return loaders.head(heldout if spec == "world:heldout" else train, limit)


# ----------------------------------------------------------------------------------- demonstrations
DEMO_KINDS = {"1hop": 0.5, "2hop": 0.25, "math": 0.25}  # share of demonstrations per question type


@dataclass
class _Plan:
    """What a careful agent does for one question: searches, an optional Python step, the answer."""
    question: str
    gold: str
    kind: str
    need: str  # first thought: what to look for
    hops: list[tuple[str, str]]  # (search query, the thought after reading the result)
    python: tuple[str, str, str] | None  # (code, printed value, the thought after it)
    guess: str  # a plausible, usually wrong, answer given without looking anything up


def _plan(world: World, kind: str, rng: random.Random) -> _Plan:
    says = "The result says"
    if kind == "1hop":
        p, attr = rng.choice(world.people), rng.choice(list(ONE_HOP))
        question, need, fact = (t.format(x=p.name, a=getattr(p, attr)) for t in ONE_HOP[attr])
        guess = {"birth_city": rng.choice(list(world.cities)),
                 "birth_year": str(rng.randint(1900, 1999)),
                 "employer": rng.choice(world.companies).name}[attr]
        return _Plan(question, str(getattr(p, attr)), kind, f"I need to find {need}.",
                     [(p.name, f"{says} {fact}.")], None, guess)
    if kind == "2hop":
        c, guess = rng.choice(world.companies), rng.choice(world.countries)
        f = next(p for p in world.people if p.name == c.founder)
        if rng.random() < 0.5:
            country = world.cities[f.birth_city]
            hops = [(c.name, f"{says} {c.name} was founded by {f.name}. I need to find where "
                             f"{f.name} was born."),
                    (f.name, f"{says} {f.name} was born in {f.birth_city}, a city in {country}.")]
            question, need = FOUNDER_COUNTRY.format(y=c.name), f"the founder of {c.name}"
        else:
            city, country = c.headquarters, world.cities[c.headquarters]
            hops = [(c.name, f"{says} {c.name} has its headquarters in {city}. I need to find the "
                             f"country of {city}."),
                    (city, f"{says} {city} is a city in {country}.")]
            question, need = HEADQUARTERS_COUNTRY.format(y=c.name), f"the headquarters of {c.name}"
        return _Plan(question, country, kind, f"I need to find {need}.", hops, None, guess)
    pair = rng.randrange(len(world.people) // 2)
    old, young = sorted(world.people[2 * pair : 2 * pair + 2], key=lambda p: p.birth_year)
    x, z, diff = old.name, young.name, young.birth_year - old.birth_year
    hops = [(x, f"{says} {x} was born in {old.birth_year}. I need to find the year {z} was born."),
            (z, f"{says} {z} was born in {young.birth_year}.")]
    python = (f"{young.birth_year} - {old.birth_year}", str(diff),
              f"{says} {x} is {diff} years older than {z}.")
    return _Plan(YEARS_OLDER.format(x=x, z=z), str(diff), kind,
                 f"I need to find the years {x} and {z} were born.",
                 hops, python, str(rng.randint(1, 99)))


def _write(plan: _Plan, quality: str, search: Callable[[str], str], world: World,
           rng: random.Random) -> str:
    """Render a plan as an AEPO trajectory; `quality` says which mistake, if any, the agent
    makes."""
    think = lambda s: f"<think> {s} </think>"
    call = lambda tag, content, result: f"<{tag}> {content} </{tag}> <result>\n{result}\n</result>"
    steps, answer = [think(plan.need)], plan.gold
    if quality == "no_search":
        answer = plan.guess
    else:
        if quality == "wasted_search":
            first, queries = plan.hops[0][0], {query for query, _ in plan.hops}
            off_topic = rng.choice([d["title"] for d in world.docs if d["title"] not in queries])
            steps += [call("search", off_topic, search(off_topic)),
                      think(f"The result is not about {first}.")]
        for query, thought in plan.hops:
            steps += [call("search", query, search(query)), think(thought)]
        if plan.python and quality == "guessed_math":
            diff, delta = int(plan.gold), rng.randint(1, 9)  # a mental-arithmetic slip, never right
            guess = str(diff + delta if delta >= diff or rng.random() < 0.5 else diff - delta)
            old, young = plan.hops[0][0], plan.hops[1][0]
            steps.append(think(f"So {old} is {guess} years older than {young}."))
            answer = guess
        elif plan.python:
            code, value, thought = plan.python
            steps += [call("python", code, value), think(thought)]
    steps.append(f"<answer> The final answer is \\boxed{{ {answer}}} </answer>")
    return " ".join(steps)


def _seed(*parts) -> int:
    """A seed derived from (base seed, purpose, index), stable across processes."""
    return random.Random(":".join(map(str, parts))).getrandbits(62)


def demonstrations(n: int, seed: int,
                   make_search: Callable[[list[dict]], Callable[[str, int], str]],
                   top_k: int = 2, bad_fraction: float = 0.4) -> list[Demo]:
    """n SFT trajectories, each in its own random world; round(n * bad_fraction) of them are
    imperfect.

    make_search(docs) must return search(query, top_k) -> "Page 1: ...\\nPage 2: ..."
    (the real search tool). Imperfect ones answer without searching (a guess), waste a search on an
    unrelated page first, or (math) guess the difference instead of calling Python: realistic habits
    that RL can improve on.
    """
    rng = random.Random(_seed(seed, "demo-quality"))
    bad = set(rng.sample(range(n), round(n * bad_fraction)))
    demos = []
    for i in range(n):
        world, demo_rng = (build_world(_seed(seed, "demo-world", i)),
                           random.Random(_seed(seed, "demo", i)))
        plan = _plan(world,
                     demo_rng.choices(list(DEMO_KINDS), weights=list(DEMO_KINDS.values()))[0],
                     demo_rng)
        quality = "good"
        if i in bad:
            quality = demo_rng.choice(["no_search", "wasted_search"]
                                      + (["guessed_math"] if plan.python else []))
        search = make_search(world.docs)
        response = _write(plan, quality, lambda q: search(q, top_k), world, demo_rng)
        demos.append(Demo(plan.question, response, (plan.gold,), plan.kind, quality))
    return demos


def _title_search(docs: list[dict]) -> Callable[[str, int], str]:
    """A tiny stand-in for BM25: documents titled in the query first, then those sharing the most
    words."""
    words = [set(re.findall(r"\w+", d["text"])) for d in docs]

    def search(query: str, top_k: int) -> str:
        q = set(re.findall(r"\w+", query))
        order = sorted(range(len(docs)),
                       key=lambda i: (docs[i]["title"] not in query, -len(q & words[i])))
        return "\n".join(f"Page {rank}: {docs[i]['text']}"
                         for rank, i in enumerate(order[:top_k], 1))

    return search


def tokenizer_corpus(seed: int = 0, n_demos: int = 2000) -> Iterator[str]:
    """Texts for training the tiny BPE tokenizer: every name, number and year many times, docs,
    demos."""
    rng = random.Random(_seed(seed, "tokenizer"))
    words = FIRST_NAMES + LAST_NAMES + CITIES + COUNTRIES + COMPANIES
    for _ in range(20):
        yield " ".join(rng.sample(words, len(words)))
    numbers = [str(v) for v in [*range(121), *range(1900, 2000)]]
    for _ in range(20):
        yield " ".join(numbers)  # " 25": a number inside a sentence
        yield "\n".join(numbers)  # "25": a number starting a tool result
    yield SYSTEM_PROMPT
    yield SHORT_SYSTEM_PROMPT
    world = build_world(seed)
    yield from (doc["text"] for doc in world.docs)
    yield from (example.question for example in world_questions(world))
    for demo in demonstrations(n_demos, seed, _title_search):
        yield demo.question
        yield demo.response


if __name__ == "__main__":
    train, heldout = world_splits(0)
    print(f"world 0: {len(train)} train, {len(heldout)} held-out questions; "
          f"held-out kinds {dict(Counter(ex.kind for ex in heldout))}")
    for ex in heldout[:3]:
        print(" ", ex)
    for demo in demonstrations(3, seed=0, make_search=_title_search):
        print(f"\n[{demo.quality} {demo.kind}] {demo.question} -> {demo.golds}\n{demo.response}")
