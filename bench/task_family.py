"""A family of generated fine-tuning tasks for bench/autotune_quality.py, and the fixed rule that splits them into a
tuning half (where the auto path's constants may be set) and a held-out half (where the goal is judged).

Eight generators of different kinds, each a function of a random.Random that returns one row:

  labels   classification with arbitrary labels: support tickets tagged with made-up codes the base model has
           never seen (vorn, tallik, ...), so the labels themselves must be learned (issue 32's hard case)
  intent   classification with ordinary labels named in the prompt (banking intents)
  extract  extraction to compact JSON: a customer message -> {"name","item","qty","city"}
  rewrite  rewriting: a messy delivery note -> one canonical sentence
  route2   routing with two factors: the department (from the topic) and the priority (from urgency cues) combine
           into one queue name, dept/priority
  confirm  short generation: an order confirmation sentence from a few fields
  prefer   preference: chosen/rejected answers to a question about a record (the rejected one is a wrong field or a
           wordy answer); trained as a preference dataset by the product, scored by exact match to the chosen one
  dates    conversion: a date written one of several ways -> ISO 8601

TASKS names each task by generator and size (rows the user brings: training plus validation), 60 to 5,000 rows.
The halves are fixed by SPLIT_SEED and the rule in split(): generators ordered by a hash of the seed and their name,
each generator's tasks likewise, and that sequence dealt alternately to the tuning and the held-out half (so a kind
with several sizes lands in both). The seed was fixed before any result of this family existed; the bench prints it and both
halves before it trains anything.
"""
from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

SPLIT_SEED = 32  # the number; fixed in code before any run of this family
HALVES = ("tune", "held-out")

NAMES = ["Ana", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena", "Mateo",
         "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara", "Zoltan"]
CITIES = ["Oslo", "Lima", "Cairo", "Denver", "Lyon", "Osaka", "Perth", "Quito", "Porto", "Austin", "Bergen", "Delhi",
          "Hanoi", "Dublin", "Tunis", "Seoul", "Boston", "Milan", "Kyiv", "Accra"]
ITEMS = ["lamp", "chair", "mug", "bag", "hat", "kettle", "scarf", "clock", "towel", "vase", "plate", "candle"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
JOBS = ["baker", "nurse", "pilot", "teacher", "plumber", "chemist", "farmer", "lawyer", "painter", "tailor"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@dataclass(frozen=True)
class Generator:
    name: str
    kind: str
    make: Callable[[random.Random], dict]


def chat_row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def prompt_of(row: dict) -> str:
    turns = row["prompt"] if "chosen" in row else row["messages"][:-1]
    return turns[-1]["content"]


def answer_of(row: dict) -> str:
    return row["chosen"] if "chosen" in row else row["messages"][-1]["content"]


# ------------------------------------------------------------------------ classification, arbitrary labels

TICKET_CODES = {"billing": "vorn", "shipping": "tallik", "login": "brusq", "refund": "memaro", "hardware": "quiln",
                "feedback": "zeddo"}
TICKETS = {
    "billing": ["I was charged twice for invoice {n}.", "Why is my bill {n} euros higher this month?",
                "{name} here, the invoice {n} has the wrong VAT number.", "Please explain the fee on statement {n}."],
    "shipping": ["My parcel {n} is stuck in {city}.", "The courier never came to {city} with order {n}.",
                 "{name} here, where is my delivery {n}?", "Tracking for {n} has not moved since {day}."],
    "login": ["I cannot sign in since {day}.", "{name} here, my password reset link for {n} expired.",
              "The app logs me out every time I open it in {city}.", "Two-factor codes never arrive on my phone."],
    "refund": ["I returned order {n} and want my money back.", "{name} here, when will the refund for {n} arrive?",
               "Please refund the {item} I sent back on {day}.", "I cancelled {n} but was not reimbursed."],
    "hardware": ["The {item} I bought makes a buzzing noise.", "{name} here, my {item} stopped working on {day}.",
                 "The screen of device {n} flickers.", "Battery of unit {n} drains in an hour."],
    "feedback": ["Great service in {city}, thank you!", "{name} here, the new website is confusing.",
                 "I love the {item}, keep it up.", "Your staff in {city} were very helpful on {day}."],
}


def labels(rng: random.Random) -> dict:
    topic = rng.choice(sorted(TICKETS))
    text = rng.choice(TICKETS[topic]).format(n=rng.randint(1000, 9999), name=rng.choice(NAMES),
                                             city=rng.choice(CITIES), day=rng.choice(DAYS), item=rng.choice(ITEMS))
    return chat_row(f"Tag this support ticket with its code.\nTicket: {text}", TICKET_CODES[topic])


# ------------------------------------------------------------------------ classification, ordinary labels

INTENTS = {
    "balance": ["what's my balance", "how much money do i have on {d}", "show my account balance", "balance for {n}",
                "check balance please", "how much is left after paying {a}"],
    "transfer": ["send money to {n}", "transfer {a} to {n}", "pay {n} back {a}", "move funds to {n}'s account"],
    "card_lost": ["i lost my card", "my card was stolen on {d}", "can't find my debit card", "block {n}'s card now",
                  "someone took my card"],
    "hours": ["when are you open", "opening hours on {d}", "are you open on {d}", "what time do you close on {d}",
              "is the branch near {n}'s office open"],
    "loan": ["i want a loan", "can i borrow {a}", "loan rates for {a}", "can {n} get a mortgage",
             "interest on a loan of {a}"],
}


def intent(rng: random.Random) -> dict:
    name = rng.choice(sorted(INTENTS))
    text = rng.choice(INTENTS[name]).format(n=rng.choice(NAMES).lower(), d=rng.choice(DAYS).lower(),
                                            a=rng.randint(5, 900))
    return chat_row(f"Classify the banking intent of this message as one of {', '.join(INTENTS)}.\n"
                    f"Message: {text}", name)


# ------------------------------------------------------------------------ extraction to JSON

ORDER_TEMPLATES = ["Hi, {name} from {city} here. Please send {qty} {item}s.",
                   "Order for {name}: {qty} x {item}, deliver to {city}.",
                   "{name} would like {qty} {item}s shipped to {city}, thanks!",
                   "Can I get {qty} {item}s? Address: {city}. Regards, {name}",
                   "Ship to {city}: {qty} {item}s for {name}."]


def extract(rng: random.Random) -> dict:
    fields = {"name": rng.choice(NAMES), "item": rng.choice(ITEMS), "qty": rng.randint(1, 12),
              "city": rng.choice(CITIES)}
    message = rng.choice(ORDER_TEMPLATES).format(**fields)
    prompt = f"Extract the order as compact JSON with keys name, item, qty, city.\nMessage: {message}"
    return chat_row(prompt, json.dumps(fields, separators=(",", ":")))


# ------------------------------------------------------------------------ rewriting

URGENT = ["asap", "urgent!!", "today pls", "rush"]
FILLER = ["hey", "pls", "thx", "ok so", "hi team"]


def rewrite(rng: random.Random) -> dict:
    qty, color, item, city = rng.randint(2, 9), rng.choice(COLORS), rng.choice(ITEMS), rng.choice(CITIES)
    urgent = rng.random() < 0.5
    parts = [f"send {qty} {color} {item}s to {city.lower()}", f"to {city.lower()}: {qty} {color} {item}s",
             f"{qty}x {color} {item} -> {city.lower()}"]
    note = rng.choice(parts)
    if rng.random() < 0.6:
        note = f"{rng.choice(FILLER)} {note}"
    if urgent:
        note = f"{note} {rng.choice(URGENT)}"
    answer = f"Deliver {qty} {color} {item}s to {city}{' (urgent)' if urgent else ''}."
    return chat_row(f"Rewrite this delivery note in the standard form.\nNote: {note}", answer)


# ------------------------------------------------------------------------ routing, two factors

DEPARTMENTS = {"accounts": ["my invoice {n} looks wrong", "I need a copy of receipt {n}", "the payment for {n} failed"],
               "platform": ["the dashboard shows error {n}", "the API returns 500 for job {n}",
                            "sync with {city} servers is broken"],
               "sales": ["I want a quote for {n} seats", "do you offer discounts in {city}",
                         "can we upgrade to the team plan"]}
PRIORITY_CUES = {"p1": ["URGENT: ", "Production is down, ", "Blocking our launch: "],
                 "p3": ["When you have time, ", "No rush, ", "Small question: "]}


def route2(rng: random.Random) -> dict:
    department, priority = rng.choice(sorted(DEPARTMENTS)), rng.choice(sorted(PRIORITY_CUES))
    body = rng.choice(DEPARTMENTS[department]).format(n=rng.randint(100, 999), city=rng.choice(CITIES))
    message = rng.choice(PRIORITY_CUES[priority]) + body
    return chat_row(f"Route this message to its queue, written department/priority.\nMessage: {message}",
                    f"{department}/{priority}")


# ------------------------------------------------------------------------ short generation

def confirm(rng: random.Random) -> dict:
    color, item, name, qty = rng.choice(COLORS), rng.choice(ITEMS), rng.choice(NAMES), rng.randint(2, 9)
    day = rng.choice(DAYS)
    return chat_row(f"Write a one-sentence order confirmation for {name}: {qty} {color} {item}s, delivery {day}.",
                    f"Thanks {name}, your {qty} {color} {item}s will arrive on {day}.")


# ------------------------------------------------------------------------ preference

def prefer(rng: random.Random) -> dict:
    name, city, job, age = rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS), rng.randint(19, 80)
    record = f"name={name}; city={city}; job={job}; age={age}"
    field, value = rng.choice([("city", city), ("job", job), ("age", str(age))])
    question = {"city": f"Which city does {name} live in?", "job": f"What is {name}'s job?",
                "age": f"How old is {name}?"}[field]
    wrong = {"city": job, "job": city, "age": str(age + rng.choice([-3, -1, 1, 2, 5]))}[field]
    rejected = wrong if rng.random() < 0.5 else f"Based on the record, the {field} of {name} is {value}."
    return {"prompt": [{"role": "user", "content": f"Answer with the value only.\nRecord: {record}\n{question}"}],
            "chosen": value, "rejected": rejected}


# ------------------------------------------------------------------------ conversion

def dates(rng: random.Random) -> dict:
    day = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 40))
    month = calendar.month_name[day.month]
    written = rng.choice([f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}",
                          f"{month[:3]} {day.day} {day.year}", f"{day.day:02d}.{day.month:02d}.{day.year}",
                          f"the {day.day}th of {month}, {day.year}"])
    return chat_row(f"Convert the date to ISO format (YYYY-MM-DD): {written}", day.isoformat())


GENERATORS = {g.name: g for g in (
    Generator("labels", "classification with arbitrary labels", labels),
    Generator("intent", "classification with ordinary labels", intent),
    Generator("extract", "extraction to JSON", extract),
    Generator("rewrite", "rewriting", rewrite),
    Generator("route2", "routing with two factors", route2),
    Generator("confirm", "short generation", confirm),
    Generator("prefer", "preference", prefer),
    Generator("dates", "conversion", dates),
)}

# name -> (generator, rows the user brings: training + validation)
TASKS = {f"{g}-{rows}": (g, rows) for g, rows in (
    ("labels", 60), ("labels", 120), ("labels", 1000), ("intent", 400), ("extract", 300), ("extract", 5000),
    ("rewrite", 200), ("route2", 120), ("route2", 2000), ("confirm", 60), ("prefer", 300), ("dates", 600),
)}


def split(tasks=None, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """{"tune": [...], "held-out": [...]}, stratified by generator so that a kind with several sizes is in both
    halves: generators ordered by sha256(f"{seed}:{generator}"), each one's tasks by sha256(f"{seed}:{task}"), and
    the tasks of that sequence dealt alternately to one half and the other. Depends on no result."""
    key = lambda text: hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()
    names = list(tasks or TASKS)
    generators = sorted({TASKS[n][0] if n in TASKS else n for n in names}, key=key)
    order = [n for g in generators for n in sorted((n for n in names if TASKS.get(n, (n,))[0] == g), key=key)]
    return {half: [n for i, n in enumerate(order) if i % 2 == k] for k, half in enumerate(HALVES)}


def half_of(name: str, seed: int = SPLIT_SEED) -> str:
    return next(h for h, names in split(seed=seed).items() if name in names)


def make_rows(generator: str, rows: int, test_rows: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rows to train on, held-out test rows): the test prompts are distinct and never appear among the training
    rows; training rows may repeat each other once the generator's variety runs out, as real data does."""
    make = GENERATORS[generator].make
    rng = random.Random(f"{generator}-{seed}")
    test, seen = [], set()
    for _ in range(50 * test_rows):
        row = make(rng)
        if prompt_of(row) not in seen:
            seen.add(prompt_of(row))
            test.append(row)
        if len(test) == test_rows:
            break
    train, fresh = [], set()
    for _ in range(200 * rows):
        row = make(rng)
        prompt = prompt_of(row)
        if prompt in seen or (prompt in fresh and len(fresh) < rows):
            continue
        fresh.add(prompt)
        train.append(row)
        if len(train) == rows:
            break
    return train, test


def problems(generator: str, row: dict) -> list[str]:
    """What is wrong with a row for its kind (an empty list: a valid row)."""
    kind = GENERATORS[generator].kind
    found = []
    if "chosen" in row:
        if kind != "preference":
            return ["a preference row from a generator of another kind"]
        if not row["chosen"] or not row["rejected"] or row["chosen"] == row["rejected"]:
            found.append("chosen and rejected must be two different, non-empty answers")
        if [t["role"] for t in row["prompt"]] != ["user"]:
            found.append("the prompt must be one user turn")
        return found
    roles = [t["role"] for t in row.get("messages", [])]
    if roles != ["user", "assistant"] or not all(t["content"].strip() for t in row["messages"]):
        return ["a chat row needs a non-empty user turn and assistant answer"]
    prompt, answer = prompt_of(row), answer_of(row)
    if generator == "labels" and answer not in TICKET_CODES.values():
        found.append(f"label {answer!r} is not a ticket code")
    if generator == "intent" and answer not in INTENTS:
        found.append(f"intent {answer!r} is not one of {', '.join(INTENTS)}")
    if generator == "extract":
        found += _json_problems(prompt, answer)
    if generator == "route2":
        department, _, priority = answer.partition("/")
        if department not in DEPARTMENTS or priority not in PRIORITY_CUES:
            found.append(f"queue {answer!r} is not department/priority")
    if generator in ("rewrite", "confirm") and (not answer.endswith(".") or answer.count(".") != 1):
        found.append("the answer must be one sentence")
    if generator == "dates":
        try:
            dt.date.fromisoformat(answer)
        except ValueError:
            found.append(f"{answer!r} is not an ISO date")
    return found


def _json_problems(prompt: str, answer: str) -> list[str]:
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return [f"{answer!r} is not JSON"]
    if answer != json.dumps(value, separators=(",", ":")):
        return ["the JSON is not compact"]
    if not isinstance(value, dict) or set(value) != {"name", "item", "qty", "city"}:
        return ["the JSON needs exactly the keys name, item, qty, city"]
    return [f"{key} {value[key]!r} is not in the message" for key in value if str(value[key]) not in prompt]
