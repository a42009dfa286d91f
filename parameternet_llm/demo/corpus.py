"""The embedded pretraining corpus: a seeded, generated world written up as web pages, encyclopedia
articles and LaTeX papers, the three kinds of source in ParameterNet's C4 / Wikipedia / ArXiv mix.

Every fact lives in `World`, so zero-shot tasks can ask about exactly what the corpus states, with
question wordings that the corpus never uses.
"""

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

SOURCES = ("web", "wiki", "arxiv")
# LLaMA's sampling proportions of C4, Wikipedia and ArXiv, renormalised to these three sources.
SOURCE_WEIGHTS = {"web": 0.682, "wiki": 0.205, "arxiv": 0.114}
DEFAULT_NUM_TOKENS = 3_000_000
# The world holds about 540 facts per unit of scale (see docs/DEMO.md for why 16).
WORLD_SCALE = 16
TOKENS_PER_WORD = 1.3  # rough ratio of BPE tokens to whitespace words for this English-like text

CLIMATES = ["arid", "temperate", "tropical", "polar", "humid", "windy"]
PRODUCTS = ["glass", "silk", "copper", "tea", "clocks", "ships", "paper", "salt", "wine", "wool", "pottery", "spices"]
PROFESSIONS = ["chemist", "astronomer", "painter", "composer", "engineer", "botanist", "mathematician", "architect"]
HABITATS = ["forests", "deserts", "marshes", "mountains", "coasts", "tundra", "grasslands", "caves"]
DIETS = ["seeds", "insects", "fish", "leaves", "fruit", "roots", "mushrooms", "snails"]
COLORS = ["red", "blue", "green", "grey", "golden", "black", "white", "brown", "orange", "silver"]
USES = [
    "dyeing cloth",
    "making lenses",
    "curing leather",
    "glazing pots",
    "fertilising fields",
    "casting bells",
    "preserving fish",
    "polishing metal",
]
ACTIONS = [
    "light the lamps",
    "ring the bell",
    "wash the stones",
    "bake the bread",
    "fill the bowls with water",
    "sing the old song",
    "open the gates",
    "burn dried herbs",
    "paint the doors",
    "carry the statue to the river",
    "plant a tree",
    "share the bread",
    "close the gates",
    "scatter salt on the road",
    "raise the banner",
    "weave a rope of reeds",
    "count the stars",
    "bury a coin",
    "pour the wine",
    "beat the drums",
    "sweep the square",
    "hang ribbons on the bridge",
    "blow the horns",
    "feed the goats",
    "kneel by the fire",
    "carve a mark on the door",
    "read the names aloud",
    "lower the banner",
    "wrap the cup in cloth",
    "climb the hill",
]

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th"]
NUCLEI = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
CODAS = ["", "", "n", "r", "s", "l", "m", "k", "th"]


@dataclass
class Country:
    name: str
    capital: str
    language: str
    currency: str
    climate: str
    animal: str


@dataclass
class City:
    name: str
    country: str
    river: str
    product: str
    founded: int


@dataclass
class Person:
    name: str
    profession: str
    birthplace: str
    work: str
    year: int


@dataclass
class Species:
    name: str
    habitat: str
    diet: str
    color: str
    legs: int


@dataclass
class Substance:
    name: str
    color: str
    soluble: bool
    use: str
    source_city: str
    discoverer: str


@dataclass
class Ritual:
    name: str
    city: str
    steps: list[str] = field(default_factory=list)


@dataclass
class World:
    """Entities and their attributes; every sentence of the corpus states one of these facts."""

    seed: int
    countries: list[Country]
    cities: list[City]
    people: list[Person]
    species: list[Species]
    substances: list[Substance]
    rituals: list[Ritual]

    @classmethod
    def generate(cls, seed: int = 0, scale: int = WORLD_SCALE) -> "World":
        """A world of `scale` times 8 countries (4 cities each), 40 people, 24 species, 16 minerals and 12
        festivals."""
        rng = random.Random(seed)
        names = NameMaker(rng)
        species = [
            Species(
                names.word().capitalize(),
                rng.choice(HABITATS),
                rng.choice(DIETS),
                rng.choice(COLORS),
                rng.choice([2, 4, 6, 8]),
            )
            for _ in range(24 * scale)
        ]
        countries = []
        cities = []
        for _ in range(8 * scale):
            country = names.word(2).capitalize()
            country_cities = [
                City(
                    names.word().capitalize(),
                    country,
                    names.word().capitalize(),
                    rng.choice(PRODUCTS),
                    rng.randrange(800, 1900),
                )
                for _ in range(4)
            ]
            cities.extend(country_cities)
            countries.append(
                Country(
                    country,
                    country_cities[0].name,
                    names.word().capitalize() + "ish",
                    names.word(),
                    rng.choice(CLIMATES),
                    rng.choice(species).name,
                )
            )
        people = [
            Person(
                f"{names.word().capitalize()} {names.word(2).capitalize()}",
                rng.choice(PROFESSIONS),
                rng.choice(cities).name,
                f"the {names.word().capitalize()} "
                f"{rng.choice(['method', 'lens', 'engine', 'theorem', 'chart', 'scale'])}",
                rng.randrange(1500, 1950),
            )
            for _ in range(40 * scale)
        ]
        substances = [
            Substance(
                names.word() + "ite",
                rng.choice(COLORS),
                rng.random() < 0.5,
                rng.choice(USES),
                rng.choice(cities).name,
                rng.choice(people).name,
            )
            for _ in range(16 * scale)
        ]
        rituals = [
            Ritual(f"the {names.word().capitalize()} festival", rng.choice(cities).name, rng.sample(ACTIONS, 5))
            for _ in range(12 * scale)
        ]
        return cls(seed, countries, cities, people, species, substances, rituals)

    def country(self, name: str) -> Country:
        return next(country for country in self.countries if country.name == name)

    def city(self, name: str) -> City:
        return next(city for city in self.cities if city.name == name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


class NameMaker:
    """Pronounceable made-up names, each used once, so every entity is new to any tokenizer or model."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int | None = None) -> str:
        while True:
            count = syllables or self.rng.choice([2, 2, 3])
            word = "".join(
                self.rng.choice(ONSETS) + self.rng.choice(NUCLEI) + (self.rng.choice(CODAS) if i == count - 1 else "")
                for i in range(count)
            )
            if word not in self.used:
                self.used.add(word)
                return word


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _city_sentences(world: World, city: City, rng: random.Random) -> list[str]:
    country = world.country(city.country)
    facts = [
        rng.choice(
            [
                f"{city.name} is a city in {country.name}.",
                f"{city.name} lies in {country.name}.",
                f"The city of {city.name} is in {country.name}.",
            ]
        ),
        rng.choice(
            [
                f"{city.name} stands on the {city.river} river.",
                f"The {city.river} river flows through {city.name}.",
                f"{city.name} was built on the banks of the {city.river}.",
            ]
        ),
        rng.choice(
            [
                f"{city.name} is famous for its {city.product}.",
                f"The {city.product} of {city.name} is known everywhere.",
                f"For centuries {city.name} has traded in {city.product}.",
            ]
        ),
        rng.choice(
            [f"{city.name} was founded in {city.founded}.", f"The city was founded in the year {city.founded}."]
        ),
    ]
    if country.capital == city.name:
        facts.append(
            rng.choice(
                [f"{city.name} is the capital of {country.name}.", f"The capital of {country.name} is {city.name}."]
            )
        )
    return facts


def _country_sentences(world: World, country: Country, rng: random.Random) -> list[str]:
    return [
        rng.choice(
            [
                f"The capital of {country.name} is {country.capital}.",
                f"{country.capital} is the capital of {country.name}.",
            ]
        ),
        rng.choice(
            [
                f"People in {country.name} speak {country.language}.",
                f"The language of {country.name} is {country.language}.",
            ]
        ),
        rng.choice(
            [
                f"The currency of {country.name} is the {country.currency}.",
                f"In {country.name} people pay with the {country.currency}.",
            ]
        ),
        rng.choice(
            [
                f"{country.name} has {_article(country.climate)} climate.",
                f"The climate of {country.name} is {country.climate}.",
            ]
        ),
        rng.choice(
            [
                f"The national animal of {country.name} is the {country.animal}.",
                f"The {country.animal} is the national animal of {country.name}.",
            ]
        ),
    ]


def _person_sentences(world: World, person: Person, rng: random.Random) -> list[str]:
    country = world.city(person.birthplace).country
    return [
        rng.choice(
            [
                f"{person.name} was {_article(person.profession)}.",
                f"{person.name} worked as {_article(person.profession)}.",
            ]
        ),
        rng.choice(
            [
                f"{person.name} was born in {person.birthplace}.",
                f"{person.name} came from {person.birthplace} in {country}.",
            ]
        ),
        rng.choice(
            [
                f"{person.name} is known for {person.work}.",
                f"{person.name} created {person.work} in {person.year}.",
                f"In {person.year}, {person.name} presented {person.work}.",
            ]
        ),
    ]


def _species_sentences(world: World, species: Species, rng: random.Random) -> list[str]:
    return [
        rng.choice(
            [f"The {species.name} lives in {species.habitat}.", f"The {species.name} is found in {species.habitat}."]
        ),
        rng.choice(
            [f"The {species.name} eats {species.diet}.", f"The diet of the {species.name} is mostly {species.diet}."]
        ),
        rng.choice([f"The {species.name} is {species.color}.", f"The {species.name} has {species.color} fur."]),
        rng.choice(
            [f"The {species.name} has {species.legs} legs.", f"The {species.name} walks on {species.legs} legs."]
        ),
    ]


def _substance_sentences(world: World, substance: Substance, rng: random.Random) -> list[str]:
    dissolves = "dissolves in water" if substance.soluble else "does not dissolve in water"
    return [
        rng.choice(
            [
                f"{substance.name.capitalize()} is {_article(substance.color)} mineral.",
                f"The mineral {substance.name} is {substance.color}.",
            ]
        ),
        rng.choice(
            [
                f"{substance.name.capitalize()} {dissolves}.",
                f"Unlike many minerals, {substance.name} {dissolves}."
                if substance.soluble
                else f"{substance.name.capitalize()} never dissolves in water.",
            ]
        ),
        rng.choice(
            [
                f"{substance.name.capitalize()} is used for {substance.use}.",
                f"Workers use {substance.name} for {substance.use}.",
            ]
        ),
        rng.choice(
            [
                f"{substance.name.capitalize()} is mined near {substance.source_city}.",
                f"Most {substance.name} comes from {substance.source_city}.",
            ]
        ),
        f"{substance.name.capitalize()} was first described by {substance.discoverer}.",
    ]


def ritual_text(ritual: Ritual) -> str:
    """The ordered steps of a ritual as the corpus tells them."""
    first, *middle, last = ritual.steps
    return " ".join(
        [f"During {ritual.name} in {ritual.city}, the people first {first}."]
        + [f"Then they {step}." for step in middle]
        + [f"At the end they {last}."]
    )


def _entity_sentences(world: World, rng: random.Random) -> tuple[str, list[str]]:
    kind = rng.choice(["city", "country", "person", "species", "substance"])
    entity = rng.choice(
        getattr(
            world,
            {
                "city": "cities",
                "country": "countries",
                "person": "people",
                "species": "species",
                "substance": "substances",
            }[kind],
        )
    )
    writer = {
        "city": _city_sentences,
        "country": _country_sentences,
        "person": _person_sentences,
        "species": _species_sentences,
        "substance": _substance_sentences,
    }[kind]
    return entity.name, writer(world, entity, rng)


def wiki_article(world: World, rng: random.Random) -> str:
    name, sentences = _entity_sentences(world, rng)
    rng.shuffle(sentences)
    related_name, related = _entity_sentences(world, rng)
    sections = [name, "", " ".join(sentences), "", "See also", "", f"{related_name}. " + " ".join(related[:2])]
    if rng.random() < 0.3:
        ritual = rng.choice(world.rituals)
        sections += ["", "Culture", "", ritual_text(ritual)]
    return "\n".join(sections)


def web_page(world: World, rng: random.Random) -> str:
    style = rng.choice(["blog", "forum", "howto", "listing"])
    header = rng.choice(["Home | About | Contact", "Menu  Search  Log in", "Skip to content"])
    footer = rng.choice(["Share this post", "Posted in Travel", "All rights reserved.", "Reply  Quote  Report"])
    if style == "howto":
        ritual = rng.choice(world.rituals)
        body = [
            f"How to take part in {ritual.name}",
            ritual_text(ritual),
            f"Visitors to {ritual.city} are welcome to join.",
        ]
    elif style == "forum":
        name, sentences = _entity_sentences(world, rng)
        body = [
            f"Question about {name}",
            f"Does anyone know much about {name}?",
            "Reply: " + " ".join(rng.sample(sentences, min(3, len(sentences)))),
            "Thanks, that helps!",
        ]
    elif style == "listing":
        substance = rng.choice(world.substances)
        body = [
            f"Fresh {substance.name} for sale",
            *_substance_sentences(world, substance, rng)[:4],
            f"Price: {rng.randrange(2, 90)} coins per sack.",
        ]
    else:
        city = rng.choice(world.cities)
        body = [
            f"My trip to {city.name}",
            "I just got back from a wonderful week away.",
            *_city_sentences(world, city, rng),
            rng.choice(["Highly recommended!", "I will go back next year."]),
        ]
    return "\n".join([header, *body, footer])


def latex_paper(world: World, rng: random.Random) -> str:
    substance = rng.choice(world.substances)
    author = rng.choice(world.people)
    value = rng.randrange(10, 99)
    sentences = _substance_sentences(world, substance, rng)
    return "\n".join(
        [
            r"\documentclass{article}",
            rf"\title{{On the properties of {substance.name}}}",
            rf"\author{{{author.name}}}",
            r"\begin{document}",
            r"\maketitle",
            r"\begin{abstract}",
            " ".join(sentences[:2]),
            r"\end{abstract}",
            r"\section{Introduction}",
            " ".join(sentences[2:]),
            " ".join(_person_sentences(world, author, rng)),
            r"\section{Measurements}",
            rf"We find that the density satisfies $\rho = {value}.{rng.randrange(10)} \pm 0.{rng.randrange(1, 9)}$ "
            rf"for samples from {substance.source_city}.",
            r"\begin{equation} E = m c^2 + \alpha_{" + str(value) + r"} \end{equation}",
            r"\section{Conclusion}",
            sentences[0],
            r"\end{document}",
        ]
    )


WRITERS = {"web": web_page, "wiki": wiki_article, "arxiv": latex_paper}


def generate_corpus(
    output_dir: str | Path,
    num_tokens: int = DEFAULT_NUM_TOKENS,
    seed: int = 0,
    shards_per_source: int = 4,
    world_scale: int = WORLD_SCALE,
) -> Path:
    """Write `output_dir/{web,wiki,arxiv}/*.jsonl` (about `num_tokens` tokens in LLaMA's proportions) about the world
    of `seed` and `world_scale`, `world.json` and `manifest.json`. Deterministic; reuses an existing complete corpus
    made with the same arguments."""
    output_dir = Path(output_dir)
    manifest_path = output_dir / "manifest.json"
    wanted = {
        "num_tokens": num_tokens,
        "seed": seed,
        "shards_per_source": shards_per_source,
        "world_scale": world_scale,
    }
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if {key: manifest.get(key) for key in wanted} == wanted:
            return output_dir
    world = World.generate(seed, world_scale)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # written last: a corpus interrupted midway is never taken as complete
    (output_dir / "world.json").write_text(world.to_json())
    documents = {}
    for source in SOURCES:
        rng = random.Random(f"{seed}-{source}")
        word_budget = num_tokens * SOURCE_WEIGHTS[source] / TOKENS_PER_WORD
        source_dir = output_dir / source
        source_dir.mkdir(exist_ok=True)
        for stale in source_dir.glob(f"{source}-*.jsonl"):  # of an earlier corpus, perhaps with more shards
            stale.unlink()
        shards = [[] for _ in range(shards_per_source)]
        words = count = 0
        while words < word_budget:
            text = WRITERS[source](world, rng)
            shards[count % shards_per_source].append(json.dumps({"text": text}) + "\n")
            words += len(text.split())
            count += 1
        for index, lines in enumerate(shards):
            (source_dir / f"{source}-{index:03d}.jsonl").write_text("".join(lines))
        documents[source] = count
    manifest_path.write_text(json.dumps({**wanted, "documents": documents}, indent=1))
    return output_dir
