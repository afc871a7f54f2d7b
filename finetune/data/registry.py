"""The registry of dataset layouts: every way a row may be laid out in a user's file, and what each becomes.

A layout answers four questions: which fields a row of it has (`required`, or `detect` when a rule needs more
than "all of these"), how such a row is normalised (`normalise`), which fields it reads besides (`optional`, so
column_map may name them), and which training schema its examples are (`yields`, one of TRAINING_SCHEMAS, the
shapes of docs/internals.md "Normalised examples"). The built-in layouts are registered in layouts.py; a new
layout is one register_layout(...) call there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .fields import Fields

# The normalised examples training understands (docs/internals.md): what a layout yields.
TRAINING_SCHEMAS = ("chat", "text", "preference", "kto")

# has(field) -> whether the row has that field (its column under column_map).
RowHas = Callable[[str], bool]


@dataclass(frozen=True)
class Layout:
    name: str  # what users choose as `schema` and what reports show
    normalise: Callable[[dict, Fields], dict]  # a row -> its normalised example; raises RowProblem for a bad row
    yields: str  # the training schema of the examples it makes (TRAINING_SCHEMAS)
    required: tuple[str, ...] = ()  # fields (our names) every row of this layout has
    optional: tuple[str, ...] = ()  # fields it reads when present
    detect: Callable[[RowHas], bool] | None = None  # whether a row is laid out so; default: has every required field
    expects: str = ""  # what a row needs, in words, for "matches no known schema"; default: the required fields
    chat: bool = False  # its rows are a conversation, which a KTO label may be added to
    precedence: int = 100  # on a detection tie the lower wins: layouts built on others (preference, kto) go first

    def fits(self, has: RowHas) -> bool:
        if self.detect is not None:
            return self.detect(has)
        return all(has(f) for f in self.required)

    def describe(self) -> str:
        return self.expects or ", ".join(self.required)

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)


# In registration order, which is the order the upload form and error messages list them in.
LAYOUTS: dict[str, Layout] = {}
# The schema names (one per layout): a live view, so a layout registered later is listed too.
SCHEMAS = LAYOUTS.keys()


def register_layout(name: str, *, normalise: Callable[[dict, Fields], dict], yields: str,
                    required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                    detect: Callable[[RowHas], bool] | None = None, expects: str = "", chat: bool = False,
                    precedence: int = 100) -> Layout:
    """Adds a layout; detection, schema=, column_map and the upload form know it from then on."""
    if name in LAYOUTS:
        raise ValueError(f"A dataset layout named {name!r} is already registered.")
    if yields not in TRAINING_SCHEMAS:
        raise ValueError(f"Layout {name!r} yields {yields!r}; it must yield one of {', '.join(TRAINING_SCHEMAS)}.")
    if not required and detect is None:
        raise ValueError(f"Layout {name!r} needs the fields that identify its rows (required=) or a detect rule.")
    layout = Layout(name, normalise, yields, tuple(required), tuple(optional), detect, expects, chat, precedence)
    LAYOUTS[name] = layout
    return layout


def by_precedence() -> list[Layout]:
    """The layouts in the order detection prefers them (registration order among equals)."""
    return sorted(LAYOUTS.values(), key=lambda layout: layout.precedence)


def chat_layouts() -> list[Layout]:
    return [layout for layout in by_precedence() if layout.chat]


def known_fields() -> list[str]:
    """Every field some layout reads: the names column_map may map."""
    return sorted({f for layout in LAYOUTS.values() for f in (*layout.required, *layout.optional)})
