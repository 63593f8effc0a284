"""What a routing policy file says, and how it is evaluated.

A policy is an ordered list of rules; the first rule whose `match` fits the request decides. A
rule either names candidate engines (and how to order them) or refuses the request. Everything
here is pure: no engine registry, no database. The router supplies the facts (`RequestFacts`)
and the numbers (`order_candidates`) and keeps the final say on availability and price.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.schemas import MAX_SIDE, MIN_SIDE, Credits, privacy_key
from tiers.base import RenderRequest, Stage, to_millicredits

POLICY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

Strategy = Literal["ordered", "cheapest", "fastest"]

PRIVACY_TAG = "privacy"
PRIVACY_LOCAL = "local"
LOCAL_ONLY = "local-only"


def is_private(tags: Mapping[str, str]) -> bool:
    """A request tagged `privacy=local` must not leave this machine, whatever the policy says.
    `Local` or ` local ` mean it too: a near miss must not send a private image to the cloud."""
    return str(tags.get(PRIVACY_TAG, "")).strip().lower() == PRIVACY_LOCAL


@dataclass(frozen=True)
class RequestFacts:
    """What rules can match on. `budget_used` is the fraction of the project's current budget
    window already held or charged; `None` when the project has no limit."""

    stage: Stage
    tags: Mapping[str, str] = field(default_factory=dict)
    engine: str | None = None  # what the client asked for; None = the policy decides
    width: int = 512
    height: int = 512
    budget_used: float | None = None

    @classmethod
    def from_request(cls, req: RenderRequest, *, engine: str | None, budget_used: float | None) -> RequestFacts:
        return cls(stage=req.stage, tags=dict(req.tags), engine=engine, width=req.width, height=req.height,
                   budget_used=budget_used)


def _as_list(value: Any) -> Any:
    """`stage = "bridge"` and `stage = ["bridge"]` mean the same; storing one shape keeps matching
    simple and keeps pydantic's error locations free of union-member noise."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("give a string or a list of strings")
    return value


def _repeated(values: list[str]) -> list[str]:
    """The values given more than once, sorted."""
    return sorted({value for value in values if values.count(value) > 1})


T = TypeVar("T")
OneOrMany = Annotated[list[T], BeforeValidator(_as_list)]


class _Model(BaseModel):
    # Strict: a policy file that says `width_over = "512"` is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Match(_Model):
    """Every key given must hold; an empty match fits every request."""

    stage: OneOrMany[Stage] | None = Field(default=None, min_length=1)
    tags: dict[str, OneOrMany[str]] = Field(default_factory=dict)
    engine: OneOrMany[str] | None = Field(default=None, min_length=1)
    # Below the largest side a request may ask: a rule over it could never apply (nor warn it).
    width_over: int | None = Field(default=None, ge=0, lt=MAX_SIDE)
    height_over: int | None = Field(default=None, ge=0, lt=MAX_SIDE)
    budget_used_over: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("stage", "engine")
    @classmethod
    def _listed_once(cls, values: list[str] | None) -> list[str] | None:
        if values is not None and (repeated := _repeated(values)):
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return values

    @field_validator("tags")
    @classmethod
    def _privacy_key(cls, tags: dict[str, list[str]]) -> dict[str, list[str]]:
        # As requests' tags are bounded (`orchestrator.schemas.Tags`): past those, no request fits.
        for key, allowed in tags.items():
            if not 1 <= len(key) <= 100 or any(len(value) > 500 for value in allowed):
                raise ValueError(f"{key[:40]!r}: a request's tag keys are 1 to 100 characters and its values at "
                                 "most 500, so no request fits this")
        empty = sorted(key for key, allowed in tags.items() if not allowed)
        if empty:
            raise ValueError(f"{', '.join(empty)}: an empty list of values fits no request (leave the key out "
                             "to match any value)")
        # As requests' keys are read: a rule matching `Privacy` as written would never fit one.
        return privacy_key(tags)

    @property
    def is_empty(self) -> bool:
        """Fits every request: no key given, or a stage list that names every stage."""
        every_stage = self.stage is None or set(self.stage) >= set(get_args(Stage))
        return every_stage and not self.tags and all(
            getattr(self, key) is None for key in type(self).model_fields if key not in ("tags", "stage"))

    @property
    def stages(self) -> frozenset[Stage]:
        """The stages of the requests it can fit."""
        return frozenset(get_args(Stage) if self.stage is None else self.stage)

    def covers(self, other: Match) -> bool:
        """Whether it fits every request `other` fits (so a rule matching `other` after a rule
        matching this never applies). Only what can be told for sure counts: a key this method
        does not know how to compare means "no", so that no rule is warned about wrongly."""
        return _covers(_cover_form(self), _cover_form(other))

    def matches(self, facts: RequestFacts) -> bool:
        if self.stage is not None and facts.stage not in self.stage:
            return False
        for key, allowed in self.tags.items():
            value = facts.tags.get(key)
            if key == PRIVACY_TAG and value is not None:
                # Read as loosely as `is_private` reads it: `Local` must meet the rule for `local`.
                if value.strip().lower() not in {a.strip().lower() for a in allowed}:
                    return False
            elif value not in allowed:
                return False
        # A rule about a requested engine never fits a request that let the policy choose.
        if self.engine is not None and facts.engine not in self.engine:
            return False
        if self.width_over is not None and not facts.width > self.width_over:
            return False
        if self.height_over is not None and not facts.height > self.height_over:
            return False
        # A project without a budget limit has no fraction to be over.
        return self.budget_used_over is None or (
            facts.budget_used is not None and facts.budget_used > self.budget_used_over)


def _tag_values(key: str, values: list[str]) -> set[str]:
    # As `Match.matches` reads them: the privacy tag's values loosely, others as written.
    return {value.strip().lower() for value in values} if key == PRIVACY_TAG else set(values)


def _over_covers(mine: Any, theirs: Any) -> bool:
    # `width > mine` holds for every request when `mine` is under the least side a request may have.
    return bool(mine < MIN_SIDE or (theirs is not None and theirs >= mine))


def _cover_form(match: Match) -> dict[str, Any]:
    """The keys `match` gives, each as `_COVERS` compares it (made once per rule: a policy's rules
    are compared pairwise, and a studio's may be thousands, one per client)."""
    form: dict[str, Any] = {}
    for key in type(match).model_fields:
        value = getattr(match, key)
        if value is None or (key == "tags" and not value):
            continue  # not given: this key fits every request
        if key == "tags":
            form[key] = {tag: frozenset(_tag_values(tag, allowed)) for tag, allowed in value.items()}
        elif isinstance(value, list):
            form[key] = frozenset(value)
        else:
            form[key] = value
    return form


def _covers(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    for key, given in mine.items():
        compare = _COVERS.get(key)
        if compare is None or not compare(given, theirs.get(key)):
            return False
    return True


_EVERY_STAGE = frozenset(get_args(Stage))

# For each key of `Match` given in the earlier rule (`mine`, in `_cover_form`'s form): whether every
# value of the key the later rule fits (`theirs`; None when the later rule leaves it out) fits mine.
_COVERS: dict[str, Callable[[Any, Any], bool]] = {
    "stage": lambda mine, theirs: (_EVERY_STAGE if theirs is None else theirs) <= mine,
    "tags": lambda mine, theirs: theirs is not None and all(key in theirs and theirs[key] <= allowed
                                                            for key, allowed in mine.items()),
    "engine": lambda mine, theirs: theirs is not None and theirs <= mine,
    "width_over": _over_covers,
    "height_over": _over_covers,
    # A project without a budget limit fits no `budget_used_over`, however low, so it never covers
    # a rule without one.
    "budget_used_over": lambda mine, theirs: theirs is not None and theirs >= mine,
}


class Rule(_Model):
    """One `[[rules]]` table: a match and exactly one action, `engines` or `deny`."""

    # Empty until the policy names it: "rule N" (1-based) when the file gives no name.
    name: str = Field(default="", min_length=1)
    match: Match
    engines: list[str] | None = Field(default=None, min_length=1)
    strategy: Strategy = "ordered"
    # The API's own bounds on an amount: `inf` or 1e300 once loaded and then failed every request
    # this rule routes on the conversion to millicredits.
    max_credits: Credits | None = None
    # The request this rule routes must stay on this machine even without a privacy tag; the
    # router drops every engine whose data leaves the machine.
    private: bool = False
    deny: str | None = Field(default=None, min_length=1)
    reason: str | None = None

    @field_validator("name", "deny", "reason")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Copied into every job's `routing` and into error messages: a NUL (PostgreSQL refuses it,
        # and the API refuses it in requests) or, in a name, a line break or nothing but spaces.
        if value is None:
            return None
        allowed = "" if info.field_name == "name" else "\n\t"
        controls = [c for c in value if unicodedata.category(c) == "Cc" and c not in allowed]
        if controls:
            raise ValueError(f"control characters are not allowed (found {controls[0]!a})")
        if info.field_name == "name" and value and not value.strip():
            raise ValueError("a name of spaces alone names nothing")
        return value

    @field_validator("engines")
    @classmethod
    def _distinct_engines(cls, engines: list[str] | None) -> list[str] | None:
        if engines is None:
            return None
        if any(not name for name in engines):
            raise ValueError("engine names must not be empty")
        if repeated := _repeated(engines):
            raise ValueError(f"engine listed more than once: {', '.join(repeated)}")
        return engines

    @model_validator(mode="after")
    def _one_action(self) -> Rule:
        if self.engines is not None and self.deny is not None:
            raise ValueError("engines, deny: give either `engines` (route) or `deny` (refuse), not both")
        if self.engines is None and self.deny is None:
            raise ValueError("engines, deny: a rule needs `engines` (route) or `deny` (refuse)")
        if self.deny is not None:
            routing_only = sorted(self.model_fields_set & {"strategy", "max_credits", "private"})
            if routing_only:
                raise ValueError(f"{', '.join(routing_only)}: only meaningful with `engines`, not with `deny`")
        return self

    @property
    def max_millicredits(self) -> int | None:
        """`max_credits` in the ledger's unit, to compare with engine estimates."""
        return None if self.max_credits is None else to_millicredits(self.max_credits)

    def keeps_local(self, tags: Mapping[str, str]) -> bool:
        """Whether the request this rule routes must stay on this machine."""
        return self.private or is_private(tags)


class Policy(_Model):
    name: str = Field(pattern=POLICY_NAME.pattern, max_length=64)
    description: str = ""
    rules: list[Rule] = Field(min_length=1)

    # Set by the loader, not by the file: which bytes this policy came from, for the routing record.
    _source: str = PrivateAttr(default="inline")
    _content_hash: str = PrivateAttr(default="")

    @field_validator("rules")
    @classmethod
    def _name_rules(cls, rules: list[Rule]) -> list[Rule]:
        named = [rule if rule.name else rule.model_copy(update={"name": f"rule {i}"})
                 for i, rule in enumerate(rules, start=1)]
        seen: dict[str, int] = {}
        for i, rule in enumerate(named, start=1):
            if rule.name in seen:
                raise ValueError(f"rule {i}: name '{rule.name}' already used by rule {seen[rule.name]}")
            seen[rule.name] = i
        # A rule after a catch-all can never fire; that is a mistake in the file, not a no-op.
        for i, rule in enumerate(named[:-1], start=1):
            if rule.match.is_empty:
                raise ValueError(f"{rule_label(i, rule)} matches every request, so the rules after it never apply")
        return named

    @model_validator(mode="after")
    def _local_only_keeps_local(self) -> Policy:
        # The name promises that nothing leaves the machine (the README, the shipped file): a file
        # in ORCH_POLICY_DIR that overrides it must keep that promise, not quietly route to a cloud.
        if self.name == LOCAL_ONLY:
            for i, rule in enumerate(self.rules, start=1):
                if rule.engines is not None and not rule.private:
                    raise ValueError(f"{rule_label(i, rule)}: the {LOCAL_ONLY} policy keeps every request on "
                                     "this machine, so each rule with `engines` must say `private = true`")
        return self

    def shadowed(self) -> list[tuple[int, int]]:
        """(i, j), 1-based: rule i never applies, as the earlier rule j fits every request it fits
        (the first such rule). Loaded all the same, as a catch-all only is refused: the loader warns."""
        forms = [_cover_form(rule.match) for rule in self.rules]
        # Not every pair: a rule with tags covers only rules giving each of its tag keys with values
        # among its own, so it is looked up by one of its keys and each of that key's values; one
        # per client made 2,000 rules 2 million comparisons, and `GET /v1/policies` took 18 s. The
        # key is its rarest (the first one made every rule a candidate when rules share it:
        # `{ account = "studio", client = "c1" }`).
        tagged = [form.get("tags", {}) for form in forms]
        seen = Counter((key, value) for tags in tagged for key, values in tags.items() for value in values)
        untagged: list[int] = []
        by_tag: dict[tuple[str, str], list[int]] = {}
        found: list[tuple[int, int]] = []
        for i, (form, tags) in enumerate(zip(forms, tagged, strict=True), start=1):
            candidates = set(untagged)
            for key, values in tags.items():
                candidates.update(by_tag.get((key, min(values)), ()))
            covering = next((j for j in sorted(candidates) if _covers(forms[j - 1], form)), None)
            if covering is not None:
                found.append((i, covering))
            if tags:
                rarest = min(tags, key=lambda key: (sum(seen[key, value] for value in tags[key]), key))
                for value in tags[rarest]:
                    by_tag.setdefault((rarest, value), []).append(i)
            else:
                untagged.append(i)
        return found

    @property
    def keeps_all_local(self) -> bool:
        """Whether every request it routes stays on this machine (`local-only`): a project moved to
        it has nothing more sent off the machine, its queued jobs included."""
        return all(rule.engines is None or rule.private for rule in self.rules)

    @property
    def source(self) -> str:
        """The file path, or "builtin" for a policy shipped in the package."""
        return self._source

    @property
    def content_hash(self) -> str:
        """First 16 hex digits of the file's sha256: which version of the policy decided."""
        return self._content_hash

    def bind_source(self, source: str, content_hash: str) -> Policy:
        self._source = source
        self._content_hash = content_hash
        return self

    def match(self, facts: RequestFacts) -> tuple[int, Rule] | None:
        """The first rule that fits, with its 1-based position; `None` when none does (the caller
        decides what that means, normally a refusal)."""
        for i, rule in enumerate(self.rules, start=1):
            if rule.match.matches(facts):
                return i, rule
        return None

    def as_dict(self) -> dict[str, Any]:
        """For `GET /v1/policies/{name}`."""
        return {**self.model_dump(exclude_none=True), "source": self.source, "content_hash": self.content_hash}


def rule_label(i: int, rule: Rule) -> str:
    """Rule `i` (1-based) as messages name it: with its name where the file gives one ("rule 1
    ('rule 1')" named a rule the file left unnamed twice over)."""
    return f"rule {i}" if rule.name == f"rule {i}" else f"rule {i} ('{rule.name}')"


def order_candidates(rule: Rule, estimates: Mapping[str, int | None],
                     latencies: Mapping[str, float | None]) -> list[str]:
    """The rule's engines in the order its strategy wants them tried.

    `estimates` are millicredits, `latencies` observed median seconds; a missing or `None` value
    means unknown and sorts last. Ties keep the order the rule lists (sorting is stable), so the
    file's order stays the tie-breaker.
    """
    if rule.engines is None:
        raise ValueError(f"rule '{rule.name}' denies; it has no engines to order")
    engines = list(rule.engines)
    if rule.strategy == "cheapest":
        return sorted(engines, key=lambda name: _unknown_last(estimates.get(name)))
    if rule.strategy == "fastest":
        return sorted(engines, key=lambda name: _unknown_last(latencies.get(name)))
    return engines


def _unknown_last(value: float | None) -> tuple[bool, float]:
    return (value is None, 0.0 if value is None else value)
