"""Zero-shot tasks about the embedded corpus's world, shaped like the paper's ARC-Easy, BoolQ and HellaSwag.

The questions ask for facts the corpus states, worded in ways the corpus never uses. The task data is
generated from `World.generate(seed)` and written as JSONL beside the lm-eval task YAMLs in `tasks/`.
"""

import json
import random
from pathlib import Path

from ..demo.corpus import WORLD_SCALE, World

TASK_NAMES = ("pnet_arc", "pnet_boolq", "pnet_hellaswag")
CHANCE = {"pnet_arc": 0.25, "pnet_boolq": 0.5, "pnet_hellaswag": 0.25}


def _options(rng: random.Random, answer: str, pool: list[str]) -> tuple[list[str], int]:
    """The answer and three distinct distractors from `pool`, shuffled; returns (choices, answer index)."""
    distractors = rng.sample(sorted(set(pool) - {answer}), 3)
    choices = distractors + [answer]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def arc_questions(world: World, rng: random.Random) -> list[dict]:
    """Four-option questions, one per fact."""
    rivers = [c.river for c in world.cities]
    cities = [c.name for c in world.cities]
    countries = [c.name for c in world.countries]
    asked = []
    for city in world.cities:
        asked.append((f"Which river runs past the city of {city.name}?", city.river, rivers))
        asked.append((f"Which country does {city.name} belong to?", city.country, countries))
        asked.append(
            (f"What is {city.name} best known for producing?", city.product, sorted({c.product for c in world.cities}))
        )
    for country in world.countries:
        asked.append((f"Which city is the seat of government of {country.name}?", country.capital, cities))
        asked.append(
            (
                f"Which language is spoken by the people of {country.name}?",
                country.language,
                [c.language for c in world.countries],
            )
        )
    for person in world.people:
        asked.append((f"In which city was {person.name} born?", person.birthplace, cities))
    for species in world.species:
        asked.append((f"What does the {species.name} feed on?", species.diet, sorted({s.diet for s in world.species})))
        asked.append(
            (
                f"Where does the {species.name} make its home?",
                species.habitat,
                sorted({s.habitat for s in world.species}),
            )
        )
    for substance in world.substances:
        asked.append((f"Near which city is {substance.name} dug up?", substance.source_city, cities))
    questions = []
    for index, (question, answer, pool) in enumerate(asked):
        choices, label = _options(rng, answer, pool)
        questions.append({"id": f"arc-{index}", "question": question, "choices": choices, "label": label})
    return questions


def boolq_questions(world: World, rng: random.Random) -> list[dict]:
    """A passage naming the entity and a yes/no question whose answer the corpus states; half are yes."""
    questions = []
    for city in world.cities:
        other = rng.choice([c for c in world.cities if c.river != city.river])
        passage = f"{city.name} is a settlement that travellers often pass through."
        truth = rng.random() < 0.5
        river = city.river if truth else other.river
        questions.append((passage, f"does the {river} river flow through {city.name}", truth))
    for country in world.countries:
        truth = rng.random() < 0.5
        capital = country.capital if truth else rng.choice([c.capital for c in world.countries if c is not country])
        questions.append(
            (
                f"{country.name} is one of the countries of this world.",
                f"is {capital} the capital city of {country.name}",
                truth,
            )
        )
    for substance in world.substances:
        questions.append(
            (
                f"{substance.name.capitalize()} is a mineral that miners know well.",
                f"will {substance.name} dissolve if it is put in water",
                substance.soluble,
            )
        )
    for species in world.species:
        truth = rng.random() < 0.5
        legs = species.legs if truth else rng.choice([n for n in (2, 4, 6, 8) if n != species.legs])
        questions.append(
            (f"The {species.name} is an animal of this world.", f"does the {species.name} have {legs} legs", truth)
        )
    return [{"id": f"boolq-{i}", "passage": p, "question": q, "label": int(a)} for i, (p, q, a) in enumerate(questions)]


def hellaswag_questions(world: World, rng: random.Random) -> list[dict]:
    """A ritual's first steps as context, and four endings: its true next step or steps of other rituals."""
    all_steps = sorted({step for ritual in world.rituals for step in ritual.steps})
    questions = []
    for ritual in world.rituals:
        for known in range(1, len(ritual.steps)):
            done = ", and then ".join(ritual.steps[:known])
            context = f"At {ritual.name}, which is held in {ritual.city}, the crowd begins to {done}. Next, they"
            answer = ritual.steps[known]
            choices, label = _options(rng, answer, [s for s in all_steps if s not in ritual.steps] + [answer])
            questions.append(
                {
                    "id": f"hellaswag-{len(questions)}",
                    "ctx": context,
                    "endings": [f"{choice}." for choice in choices],
                    "label": label,
                }
            )
    return questions


GENERATORS = {"pnet_arc": arc_questions, "pnet_boolq": boolq_questions, "pnet_hellaswag": hellaswag_questions}


# Questions per task: one question is 0.2 points of accuracy, and scoring a small model stays quick on a CPU.
MAX_QUESTIONS = 500


def generate_task_data(seed: int = 0, scale: int = WORLD_SCALE) -> dict[str, list[dict]]:
    """Every task's documents for the world of `seed` and `scale` (the shipped tasks: the embedded corpus's
    world, seed 0 and WORLD_SCALE): at most MAX_QUESTIONS per task, a seeded sample in generation order."""
    world = World.generate(seed, scale)
    tasks = {}
    for name, generator in GENERATORS.items():
        rng = random.Random(f"{seed}-{name}")
        documents = generator(world, rng)
        if len(documents) > MAX_QUESTIONS:
            documents = [documents[i] for i in sorted(rng.sample(range(len(documents)), MAX_QUESTIONS))]
        tasks[name] = documents
    return tasks


def write_task_data(tasks_dir: str | Path, seed: int = 0, scale: int = WORLD_SCALE) -> None:
    """Write `tasks_dir/<task>/test.jsonl` for every task."""
    for name, documents in generate_task_data(seed, scale).items():
        path = Path(tasks_dir) / name / "test.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(doc) + "\n" for doc in documents))
