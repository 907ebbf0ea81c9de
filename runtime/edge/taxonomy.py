"""The department taxonomy: which words make a question belong to which department.

The router uses it to see that a question needs knowledge outside the device's departments (then the core,
which holds every department, answers it). The file (`examples/taxonomy.yaml`) names each department's
keywords and phrases, department-wide or grouped by topic. Matching is case-insensitive, on whole words, and
tolerant of simple inflections ("valves" matches "valve", "approved" matches "approve"), by reducing both the
terms and the question to the same crude stems. A term may belong to one department only: a shared term could
not say where a question belongs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from runtime.common.yamldoc import load_model

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lower-case name: letters, digits, '-'")]

_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; '-', '_' and punctuation separate words


def stem(word: str) -> str:
    """A crude English stem, the same for a word's plural and -ed / -ing forms. Not a linguist: it only has to
    reduce a term and the words of a question alike."""
    w = word.casefold()
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith(("sses", "xes", "zes", "ches", "shes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    if len(w) >= 6 and w.endswith("ied"):
        w = w[:-3] + "y"
    elif len(w) >= 6 and w.endswith(("ing", "ed")):
        w = w[: -3 if w.endswith("ing") else -2]
        if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz" and not w[-1].isdigit():
            w = w[:-1]  # planning -> plan, stopped -> stop
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]  # price / pricing / priced all become "pric"
    return w


def stems(text: str) -> tuple[str, ...]:
    return tuple(stem(m.group()) for m in _WORD.finditer(text))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=True)


Term = Annotated[str, Field(min_length=2, max_length=100)]


def _check_names(names: Any, what: str) -> Any:
    """One clear message for a bad mapping key (pydantic's names the key only as '[key]')."""
    if isinstance(names, dict):
        for name in names:
            if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
                raise PydanticCustomError(
                    "invalid_name",
                    "'{name}' is not a {what} name (lower-case letters, digits, '-')",
                    {"name": str(name)[:60], "what": what, "at": [str(name)]},
                )
    return names


def _check_terms(terms: list[str]) -> list[str]:
    seen: dict[tuple[str, ...], int] = {}
    for index, term in enumerate(terms):
        key = stems(term)
        if not key:
            raise PydanticCustomError(
                "empty_term", "'{term}' has no letters or digits to match", {"term": term[:60], "at": [index]}
            )
        if key in seen:
            raise PydanticCustomError(
                "duplicate_term",
                "'{term}' repeats item {first} (the same words once stemmed)",
                {"term": term[:60], "first": seen[key], "at": [index]},
            )
        seen[key] = index
    return terms


class Department(_Strict):
    description: str = ""
    keywords: list[Term] = Field(default_factory=list, description="words and phrases of the whole department")
    topics: dict[Name, list[Term]] = Field(default_factory=dict, description="topic -> its words and phrases")

    @field_validator("topics", mode="before")
    @classmethod
    def _topic_names(cls, topics: Any) -> Any:
        return _check_names(topics, "topic")

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, terms: list[str]) -> list[str]:
        return _check_terms(terms)

    @field_validator("topics")
    @classmethod
    def _topics(cls, topics: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, terms in topics.items():
            try:
                _check_terms(terms)
            except PydanticCustomError as exc:
                ctx = dict(exc.context or {})
                ctx["at"] = [name, *ctx.get("at", [])]
                raise PydanticCustomError(exc.type, exc.message_template, ctx) from None
        return topics

    @model_validator(mode="after")
    def _has_terms(self) -> Department:
        if not self.keywords and not any(self.topics.values()):
            raise PydanticCustomError("no_terms", "a department needs keywords or topics with terms", {"at": []})
        return self

    def terms(self) -> list[tuple[str | None, int, str]]:
        """(topic or None, index in its list, term) in file order."""
        out: list[tuple[str | None, int, str]] = [(None, i, t) for i, t in enumerate(self.keywords)]
        out += [(topic, i, t) for topic, terms in self.topics.items() for i, t in enumerate(terms)]
        return out


@dataclass(frozen=True)
class TermMatch:
    department: str
    topic: str | None
    term: str  # as written in the taxonomy


class Taxonomy(_Strict):
    departments: dict[Name, Department] = Field(min_length=1)

    @field_validator("departments", mode="before")
    @classmethod
    def _department_names(cls, departments: Any) -> Any:
        return _check_names(departments, "department")

    @field_validator("departments")
    @classmethod
    def _one_department_per_term(cls, departments: dict[str, Department]) -> dict[str, Department]:
        owner: dict[tuple[str, ...], str] = {}
        for name, dept in departments.items():
            for topic, index, term in dept.terms():
                key = stems(term)
                if key in owner and owner[key] != name:
                    where: list[Any] = [name, "keywords", index] if topic is None else [name, "topics", topic, index]
                    raise PydanticCustomError(
                        "shared_term",
                        "'{term}' is already a term of department '{other}': a term belongs to one department",
                        {"term": term[:60], "other": owner[key], "at": where},
                    )
                owner.setdefault(key, name)
        return departments

    def matches(self, question: str) -> list[TermMatch]:
        """Every taxonomy term found in `question`, in taxonomy order, each once."""
        words = stems(question)
        found: list[TermMatch] = []
        for name, dept in self.departments.items():
            for topic, _, term in dept.terms():
                if _contains(words, stems(term)):
                    found.append(TermMatch(name, topic, term))
        return found

    def departments_for(self, question: str) -> dict[str, list[str]]:
        """Department -> the terms of it that `question` mentions; departments with no match are left out."""
        out: dict[str, list[str]] = {}
        for match in self.matches(question):
            terms = out.setdefault(match.department, [])
            if match.term not in terms:
                terms.append(match.term)
        return out


def _contains(words: tuple[str, ...], phrase: tuple[str, ...]) -> bool:
    n = len(phrase)
    return any(words[i : i + n] == phrase for i in range(len(words) - n + 1))


def load_taxonomy(path: Path) -> Taxonomy:
    """Read and validate a taxonomy file; raises yamldoc.InvalidFile listing every problem with its line."""
    return load_model(Path(path), Taxonomy)
