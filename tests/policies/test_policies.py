"""Policy files: the schema, matching, strategies, the built-ins and the reloading store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import InvalidRequest, NotFound
from policies import (
    Policy,
    PolicyError,
    PolicyStore,
    RequestFacts,
    Rule,
    is_private,
    load_policy_file,
    order_candidates,
)
from tiers.base import STAGES, RenderRequest, Stage
from tiers.registry import BUILTIN as BUILTIN_ENGINES

# Every built-in engine but the two on this machine sends its request off it (an engine added later too).
REMOTE = frozenset(BUILTIN_ENGINES) - {"lite", "local-hifi"}
BUILTINS = ("balanced", "local-only", "cloud-first", "budget-saver")


def policy(*rules: dict[str, Any]) -> Policy:
    return Policy.model_validate({"name": "t", "rules": list(rules)})


def facts(stage: Stage = "bridge", **kw: Any) -> RequestFacts:
    return RequestFacts(stage=stage, **kw)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


GOOD = """
name = "{name}"
description = "{description}"
[[rules]]
match = {{}}
engines = ["lite"]
"""


# --- matching -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("match", "request_facts", "expected"), [
    ({"stage": "bridge"}, facts("bridge"), True),
    ({"stage": "bridge"}, facts("polish"), False),
    ({"stage": ["bridge", "polish"]}, facts("polish"), True),
    ({"stage": ["bridge", "polish"]}, facts("ideation"), False),
    ({"tags": {"privacy": "local"}}, facts(tags={"privacy": "local"}), True),
    ({"tags": {"privacy": "local"}}, facts(tags={"privacy": "cloud"}), False),
    ({"tags": {"privacy": "local"}}, facts(tags={}), False),
    # The privacy value is read as loosely as the engine filter reads it; other tags exactly.
    ({"tags": {"privacy": "local"}}, facts(tags={"privacy": " Local "}), True),
    ({"tags": {"privacy": "LOCAL"}}, facts(tags={"privacy": "local"}), True),
    ({"tags": {"client": "acme"}}, facts(tags={"client": "Acme"}), False),
    ({"tags": {"client": ["acme", "globex"]}}, facts(tags={"client": "globex"}), True),
    ({"tags": {"client": ["acme", "globex"], "privacy": "local"}}, facts(tags={"client": "acme"}), False),
    ({"engine": "gemini"}, facts(engine="gemini"), True),
    ({"engine": ["gemini", "openai"]}, facts(engine="openai"), True),
    ({"engine": "gemini"}, facts(engine="stability"), False),
    ({"engine": "gemini"}, facts(engine=None), False),
    ({"width_over": 1024}, facts(width=1025), True),
    ({"width_over": 1024}, facts(width=1024), False),
    ({"height_over": 1024}, facts(height=2048), True),
    ({"height_over": 1024}, facts(height=512), False),
    ({"budget_used_over": 0.8}, facts(budget_used=0.81), True),
    ({"budget_used_over": 0.8}, facts(budget_used=0.8), False),
    ({"budget_used_over": 0.0}, facts(budget_used=None), False),  # no limit: never "over"
    ({"stage": "bridge", "budget_used_over": 0.5}, facts("bridge", budget_used=0.9), True),
    ({"stage": "bridge", "budget_used_over": 0.5}, facts("polish", budget_used=0.9), False),
    ({}, facts("ideation", tags={"x": "y"}, engine="lite"), True),
])
def test_match_keys(match: dict[str, Any], request_facts: RequestFacts, expected: bool) -> None:
    p = policy({"match": match, "engines": ["lite"]})
    assert (p.match(request_facts) is not None) is expected


def test_first_matching_rule_wins_and_rules_get_names() -> None:
    p = policy(
        {"match": {"stage": "ideation"}, "engines": ["lite"]},
        {"name": "big", "match": {"width_over": 1000}, "engines": ["local-hifi"]},
        {"match": {"stage": ["bridge", "polish"]}, "engines": ["gemini"]},
        {"match": {}, "deny": "nothing else"},
    )
    assert [r.name for r in p.rules] == ["rule 1", "big", "rule 3", "rule 4"]
    found = p.match(facts("bridge", width=2048))
    assert found is not None and found[0] == 2 and found[1].name == "big"
    found = p.match(facts("ideation", width=2048))
    assert found is not None and found[0] == 1


def test_no_matching_rule_returns_none() -> None:
    assert policy({"match": {"stage": "ideation"}, "engines": ["lite"]}).match(facts("polish")) is None


def test_a_rule_s_privacy_key_is_read_as_requests_are() -> None:
    # Requests store `Privacy` as `privacy`: a rule written `Privacy` would otherwise never fit.
    p = policy({"match": {"tags": {" Privacy": "local"}}, "engines": ["lite"]})
    assert p.rules[0].match.tags == {"privacy": ["local"]}
    assert p.match(facts(tags={"privacy": "local"})) is not None


def test_a_byte_order_mark_is_not_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.format(name="mine", description="saved by a Windows editor").encode())
    assert load_policy_file(path).description == "saved by a Windows editor"


def test_local_only_keeps_its_promise_when_overridden(tmp_path: Path) -> None:
    # The name says nothing leaves the machine; an override that routes without `private` would
    # quietly send every project on it to whatever its rules list.
    write(tmp_path, "local-only", 'name = "local-only"\n[[rules]]\nname = "drafts"\nmatch = { stage = "ideation" }\n'
          'engines = ["lite"]\nprivate = true\n[[rules]]\nname = "out"\nmatch = {}\nengines = ["gemini"]\n')
    store = PolicyStore(tmp_path)
    assert [e.message for e in store.errors] == [
        f"{tmp_path / 'local-only.toml'}: rule 2 ('out'): the local-only policy keeps every request on this "
        "machine, so each rule with `engines` must say `private = true`"]
    assert store.get("local-only").source == "builtin"
    assert all(rule.private for rule in store.get("local-only").rules if rule.engines)


def test_a_rule_the_file_leaves_unnamed_is_named_by_its_position_once(tmp_path: Path) -> None:
    # Named "rule 2" by the loader, it was told as "rule 2 ('rule 2')", as if the file had named it so.
    write(tmp_path, "local-only", 'name = "local-only"\n[[rules]]\nmatch = { stage = "ideation" }\n'
          'engines = ["lite"]\nprivate = true\n[[rules]]\nmatch = {}\nengines = ["gemini"]\n')
    write(tmp_path, "early", 'name = "early"\n[[rules]]\nmatch = {}\nengines = ["lite"]\n'
          '[[rules]]\nmatch = { stage = "bridge" }\nengines = ["lite"]\n')
    store = PolicyStore(tmp_path)
    assert sorted(e.message for e in store.errors) == [
        f"{tmp_path / 'early.toml'}: rules: rule 1 matches every request, so the rules after it never apply",
        f"{tmp_path / 'local-only.toml'}: rule 2: the local-only policy keeps every request on this machine, so "
        "each rule with `engines` must say `private = true`"]


def test_privacy_helpers() -> None:
    assert is_private({"privacy": "local"})
    assert not is_private({"privacy": "cloud"})
    assert not is_private({})
    plain = Rule.model_validate({"match": {}, "engines": ["lite"]})
    forced = Rule.model_validate({"match": {}, "engines": ["lite"], "private": True})
    assert plain.keeps_local({"privacy": "local"}) and not plain.keeps_local({})
    assert forced.keeps_local({})


def test_facts_from_request() -> None:
    req = RenderRequest(stage="polish", prompt="p", width=1024, height=768, tags={"privacy": "local"})
    f = RequestFacts.from_request(req, engine="gemini", budget_used=0.25)
    assert (f.stage, f.width, f.height, f.engine, f.budget_used) == ("polish", 1024, 768, "gemini", 0.25)
    assert is_private(f.tags)


# --- strategies -----------------------------------------------------------------------------------

ENGINES = ["gemini", "stability", "openai", "local-hifi"]


@pytest.mark.parametrize(("strategy", "estimates", "latencies", "expected"), [
    ("ordered", {"gemini": 40, "stability": 10}, {}, ENGINES),
    ("cheapest", {"gemini": 40, "stability": 30, "openai": 20, "local-hifi": 0},
     {}, ["local-hifi", "openai", "stability", "gemini"]),
    # ties keep the listed order
    ("cheapest", {"gemini": 30, "stability": 30, "openai": 10, "local-hifi": 30},
     {}, ["openai", "gemini", "stability", "local-hifi"]),
    # unknown (None or missing) estimates go last, in listed order
    ("cheapest", {"gemini": None, "stability": 50, "local-hifi": 0},
     {}, ["local-hifi", "stability", "gemini", "openai"]),
    ("fastest", {}, {"gemini": 9.0, "stability": 3.5, "openai": 3.5, "local-hifi": 20.0},
     ["stability", "openai", "gemini", "local-hifi"]),
    ("fastest", {}, {"openai": 4.0, "gemini": None}, ["openai", "gemini", "stability", "local-hifi"]),
    ("fastest", {}, {}, ENGINES),
])
def test_order_candidates(strategy: str, estimates: dict[str, int | None],
                          latencies: dict[str, float | None], expected: list[str]) -> None:
    rule = Rule.model_validate({"match": {}, "engines": ENGINES, "strategy": strategy})
    assert order_candidates(rule, estimates, latencies) == expected


def test_order_candidates_refuses_a_deny_rule() -> None:
    with pytest.raises(ValueError, match="denies"):
        order_candidates(Rule.model_validate({"match": {}, "deny": "no"}), {}, {})


def test_max_credits_in_millicredits() -> None:
    rule = Rule.model_validate({"match": {}, "engines": ["gemini"], "max_credits": 2.5})
    assert rule.max_millicredits == 2500
    whole = Rule.model_validate({"match": {}, "engines": ["gemini"], "max_credits": 10})
    assert whole.max_credits == 10 and whole.max_millicredits == 10_000  # a TOML integer is a fine amount
    assert Rule.model_validate({"match": {}, "engines": ["gemini"], "max_credits": 0.001}).max_millicredits == 1


# --- built-in policies ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtins() -> PolicyStore:
    store = PolicyStore()
    assert store.errors == []
    return store


def test_builtins_are_all_there(builtins: PolicyStore) -> None:
    assert set(BUILTINS) <= set(builtins.names())
    for p in builtins.list():
        assert p.source == "builtin" and len(p.content_hash) == 16 and p.description


PROBES = [
    facts(stage, tags=tags, engine=engine, width=w, height=w, budget_used=used)
    for stage in STAGES
    for tags in ({}, {"privacy": "local"}, {"privacy": "local", "client": "acme"})
    for engine in (None, "gemini", "lite")
    for w in (512, 4096)
    for used in (None, 0.0, 0.6, 0.95)
]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_routes_ideation_to_lite(builtins: PolicyStore, name: str) -> None:
    for probe in (p for p in PROBES if p.stage == "ideation"):
        found = builtins.get(name).match(probe)
        assert found is not None, probe
        assert found[1].engines is not None and found[1].engines[0] == "lite", probe


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_keeps_private_requests_local(builtins: PolicyStore, name: str) -> None:
    for probe in (p for p in PROBES if is_private(p.tags)):
        found = builtins.get(name).match(probe)
        assert found is not None, probe
        rule = found[1]
        assert rule.deny is not None or not (set(rule.engines or []) & REMOTE), (name, rule.name, probe)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_routes_every_stage(builtins: PolicyStore, name: str) -> None:
    for probe in PROBES:
        found = builtins.get(name).match(probe)
        assert found is not None and found[1].engines, (name, probe)


def test_local_only_never_names_a_remote_engine(builtins: PolicyStore) -> None:
    for rule in builtins.get("local-only").rules:
        assert not set(rule.engines or []) & REMOTE


@pytest.mark.parametrize(("name", "used", "expected_rule", "first"), [
    ("balanced", 0.81, "soft-budget", "local-hifi"),
    ("balanced", 0.5, "cheapest", "gemini"),
    ("balanced", None, "cheapest", "gemini"),
    ("budget-saver", 0.51, "half-budget", "local-hifi"),
    ("budget-saver", 0.2, "cheapest-capped", "gemini"),
    ("cloud-first", 0.99, "cloud", "gemini"),
])
def test_builtin_budget_rules(builtins: PolicyStore, name: str, used: float | None,
                              expected_rule: str, first: str) -> None:
    found = builtins.get(name).match(facts("polish", budget_used=used))
    assert found is not None
    assert found[1].name == expected_rule and found[1].engines is not None and found[1].engines[0] == first


def test_builtin_soft_budget_reason_and_cap(builtins: PolicyStore) -> None:
    soft = builtins.get("balanced").match(facts("bridge", budget_used=0.9))
    assert soft is not None and soft[1].reason == "soft budget limit"
    capped = builtins.get("budget-saver").match(facts("bridge"))
    assert capped is not None and capped[1].max_credits == 10 and capped[1].strategy == "cheapest"


# --- bad files ------------------------------------------------------------------------------------

RULES_OK = '[[rules]]\nname = "drafts"\nmatch = { stage = "ideation" }\nengines = ["lite"]\n'


@pytest.mark.parametrize(("body", "must_name"), [
    ('name = "bad"\n[[rules]\nmatch = {}\n', ["TOML syntax error", "line 2"]),
    ('name = "bad"\ncolour = "red"\n' + RULES_OK, ["colour", "unknown key"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "odd"\nmatch = { colour = "red" }\nengines = ["lite"]\n',
     ["rule 2 ('odd')", "match.colour", "unknown key"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "both"\nmatch = {}\nengines = ["lite"]\ndeny = "no"\n',
     ["rule 2 ('both')", "engines", "deny", "not both"]),
    ('name = "bad"\n[[rules]]\nmatch = {}\n', ["rule 1", "engines", "deny"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "bridge-x"\nmatch = {}\nengines = ["gemini"]\n'
     'strategy = "quickest"\n', ["rule 2 ('bridge-x')", "strategy", "'quickest'"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "wide"\nmatch = { width_over = "1024" }\nengines = ["x"]\n',
     ["rule 2 ('wide')", "match.width_over", "integer"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nmatch = {}\nengines = "gemini"\n',
     ["rule 2:", "engines", "list"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "st"\nmatch = { stage = ["bridge", "final"] }\nengines = ["x"]\n',
     ["rule 2 ('st')", "match.stage[1]", "'final'"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "t"\nmatch = { tags = { privacy = 3 } }\nengines = ["x"]\n',
     ["rule 2 ('t')", "match.tags.privacy", "string or a list of strings"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "b"\nmatch = { budget_used_over = 1.5 }\nengines = ["x"]\n',
     ["rule 2 ('b')", "match.budget_used_over"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "cap"\nmatch = {}\ndeny = "no"\nmax_credits = 5\n',
     ["rule 2 ('cap')", "max_credits", "deny"]),
    # Loaded, a rule that could never fit a request.
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "none"\nmatch = { tags = { client = [] } }\nengines = ["x"]\n',
     ["rule 2 ('none')", "match.tags", "client: an empty list"]),
    # A cap of inf once loaded, then answered every request the rule routed with 500.
    *[('name = "bad"\n' + RULES_OK + f'[[rules]]\nname = "cap"\nmatch = {{}}\nengines = ["x"]\nmax_credits = {cap}\n',
       ["rule 2 ('cap')", "max_credits", f"(got {got})"])
      for cap, got in [("inf", "inf"), ("-inf", "-inf"), ("nan", "nan"), ("1e300", "1e+300"),
                       ("2_000_000_000", "2000000000")]],
    # A rule that could never apply, loaded without a word.
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "w"\nmatch = { width_over = 8192 }\nengines = ["x"]\n',
     ["rule 2 ('w')", "match.width_over", "less than 8192"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "s"\nmatch = { stage = ["bridge", "bridge"] }\nengines = ["x"]\n',
     ["rule 2 ('s')", "match.stage", "listed more than once: bridge"]),
    # NaN fails every bound: it was refused as "greater than or equal to 0".
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "cap"\nmatch = {}\nengines = ["x"]\nmax_credits = nan\n',
     ["rule 2 ('cap')", "max_credits", "finite number"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "b"\nmatch = { budget_used_over = nan }\nengines = ["x"]\n',
     ["rule 2 ('b')", "match.budget_used_over", "finite number"]),
    # Copied into every job's routing: a NUL failed its write on PostgreSQL.
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "a\\u0000b"\nmatch = {}\nengines = ["x"]\n',
     ["rule 2 ('a\\x00b'): name:", "control characters", "'\\x00'"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "two\\nlines"\nmatch = {}\nengines = ["x"]\n',
     ["rule 2 ('two\\nlines'): name:", "control characters"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "   "\nmatch = {}\nengines = ["x"]\n',
     ["rule 2 ('   '): name:", "spaces alone"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "r"\nmatch = {}\nengines = ["x"]\nreason = "a\\u0000"\n',
     ["rule 2 ('r')", "reason", "control characters"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "cap"\nmatch = {}\nengines = ["x"]\nmax_credits = 1.2345\n',
     ["rule 2 ('cap')", "max_credits", "at most 3 decimals"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "cap"\nmatch = {}\nengines = ["x"]\nmax_credits = true\n',
     ["rule 2 ('cap')", "max_credits", "not true/false"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "dup"\nmatch = {}\nengines = ["lite", "lite"]\n',
     ["rule 2 ('dup')", "engines", "more than once"]),
    ('name = "bad"\n[[rules]]\nmatch = {}\nengines = ["lite"]\n' + RULES_OK, ["rule 1", "never apply"]),
    ('name = "bad"\n' + RULES_OK + RULES_OK, ["rules", "drafts", "already used"]),
    ('name = "bad"\nrules = []\n', ["rules", "at least 1"]),
    ('name = "other"\n' + RULES_OK, ["name", "'other'", "file name"]),
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "t"\nmatch = { tags = { privacy = "local", Privacy = "x" } }\n'
     'engines = ["x"]\n', ["rule 2 ('t')", "match.tags", "privacy tag is given twice"]),
    ('description = "no name"\n' + RULES_OK, ["name", "Field required"]),
    # Every stage listed is a catch-all as `{}` is: the rules after it never applied, unsaid.
    ('name = "bad"\n[[rules]]\nname = "all"\nmatch = { stage = ["ideation", "bridge", "polish"] }\n'
     'engines = ["lite"]\n' + RULES_OK, ["rule 1 ('all')", "never apply"]),
    # A tag no request can carry: a rule that never fits.
    ('name = "bad"\n' + RULES_OK + '[[rules]]\nname = "t"\nmatch = { tags = { "" = "a" } }\nengines = ["x"]\n',
     ["rule 2 ('t')", "match.tags", "1 to 100 characters"]),
    # Some hundreds of nested brackets: a RecursionError, a 500 at reload and a traceback at start.
    ('name = "bad"\nx = ' + "[" * 2000 + "]" * 2000 + "\n" + RULES_OK, ["nested too deeply"]),
])
def test_bad_file_errors_name_file_rule_and_field(tmp_path: Path, body: str, must_name: list[str]) -> None:
    path = write(tmp_path, "bad", body)
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path)
    message = caught.value.message
    assert message.startswith(f"{path}: "), message
    for fragment in must_name:
        assert fragment in message, (fragment, message)
    assert isinstance(caught.value, InvalidRequest)
    assert caught.value.details == {"file": str(path)}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy_file(tmp_path / "nope.toml")


def test_loaded_file_records_source_and_hash(tmp_path: Path) -> None:
    path = write(tmp_path, "mine", GOOD.format(name="mine", description="v1"))
    first = load_policy_file(path)
    assert first.source == str(path) and len(first.content_hash) == 16
    path.write_text(GOOD.format(name="mine", description="v2"))
    assert load_policy_file(path).content_hash != first.content_hash
    assert first.as_dict()["content_hash"] == first.content_hash


# --- the store ------------------------------------------------------------------------------------

def test_store_get_unknown_raises_not_found() -> None:
    with pytest.raises(NotFound):
        PolicyStore().get("nope")


def test_extra_dir_adds_and_overrides(tmp_path: Path) -> None:
    write(tmp_path, "studio", GOOD.format(name="studio", description="added"))
    write(tmp_path, "balanced", GOOD.format(name="balanced", description="overridden"))
    (tmp_path / "notes.txt").write_text("ignored")
    store = PolicyStore(tmp_path)
    assert store.errors == []
    assert set(store.names()) == {*BUILTINS, "studio"}
    assert store.get("balanced").description == "overridden"
    assert store.get("balanced").source == str(tmp_path / "balanced.toml")
    assert store.get("local-only").source == "builtin"
    assert [p.name for p in store.list()] == store.names()


def test_reload_keeps_last_good_version(tmp_path: Path) -> None:
    path = write(tmp_path, "studio", GOOD.format(name="studio", description="v1"))
    store = PolicyStore(tmp_path, include_builtins=False)
    assert store.names() == ["studio"]
    good = store.get("studio")

    path.write_text('name = "studio"\n[[rules]]\nmatch = {}\nengines = ["lite"]\ndeny = "no"\n')
    errors = store.reload()
    assert len(errors) == 1 and str(path) in errors[0].message and "rule 1" in errors[0].message
    assert store.errors == errors
    assert store.get("studio") is good  # still served

    path.write_text(GOOD.format(name="studio", description="v2"))
    assert store.reload() == []
    assert store.get("studio").description == "v2"


def test_a_fifo_or_a_huge_file_is_refused_not_read(tmp_path: Path) -> None:
    """A FIFO named `*.toml` held every reload (and the start) until something wrote to it; a 50 MB
    description took 9 s a reload and went whole to every `GET /v1/policies`."""
    import os

    os.mkfifo(tmp_path / "waiting.toml")
    write(tmp_path, "huge", GOOD.format(name="huge", description="x" * (1024 * 1024)))
    write(tmp_path, "studio", GOOD.format(name="studio", description="fine"))
    store = PolicyStore(tmp_path, include_builtins=False)
    assert store.names() == ["studio"]
    said = sorted(error.message for error in store.errors)
    assert len(said) == 2
    assert "huge.toml: larger than 1 MiB" in said[0] and "waiting.toml: cannot read" in said[1]


def test_bad_override_falls_back_to_builtin_then_keeps_last_good(tmp_path: Path) -> None:
    path = write(tmp_path, "balanced", "name = [oops\n")
    store = PolicyStore(tmp_path)
    assert len(store.errors) == 1 and "line 1" in store.errors[0].message
    assert store.get("balanced").source == "builtin"

    path.write_text(GOOD.format(name="balanced", description="mine"))
    assert store.reload() == []
    path.write_text("name = [oops\n")
    assert len(store.reload()) == 1
    assert store.get("balanced").description == "mine"


def test_new_bad_file_is_refused_and_deleted_file_is_dropped(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path, include_builtins=False)
    assert store.names() == []
    write(tmp_path, "broken", 'name = "broken"\n')
    assert len(store.reload()) == 1 and "broken" not in store
    keep = write(tmp_path, "keep", GOOD.format(name="keep", description="k"))
    (tmp_path / "broken.toml").unlink()
    assert store.reload() == [] and store.names() == ["keep"]
    keep.unlink()
    assert store.reload() == [] and store.names() == []


def test_missing_extra_dir_is_reported_and_keeps_its_policies(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    write(extra, "studio", GOOD.format(name="studio", description="s"))
    store = PolicyStore(extra)
    for child in extra.iterdir():
        child.unlink()
    extra.rmdir()
    errors = store.reload()
    assert len(errors) == 1 and "not found" in errors[0].message
    assert "studio" in store and "balanced" in store
    # A policy file given where the directory goes is told as that, not as missing.
    file = write(tmp_path, "studio", GOOD.format(name="studio", description="s"))
    errors = PolicyStore(file).reload()
    assert [e.message for e in errors] == [f"{file}: is a file, not a directory of policy files"]


def test_store_refuses_a_cap_it_could_not_apply(tmp_path: Path) -> None:
    # Loaded, `max_credits = inf` failed every bridge and polish request of its projects with a 500.
    write(tmp_path, "capped", 'name = "capped"\n[[rules]]\nmatch = {}\nengines = ["lite"]\nmax_credits = inf\n')
    store = PolicyStore(tmp_path, include_builtins=False)
    assert "capped" not in store
    assert len(store.errors) == 1 and "capped.toml" in store.errors[0].message
    assert "max_credits" in store.errors[0].message


# --- engines the registry does not know -----------------------------------------------------------

def test_builtin_policies_name_only_builtin_engines(builtins: PolicyStore) -> None:
    assert builtins.engine_warnings(BUILTIN_ENGINES) == []


def test_unknown_engines_are_warned_about_once_each(tmp_path: Path) -> None:
    # Such a policy loaded without a word, and then every request it routed failed with 503.
    path = write(tmp_path, "typos", 'name = "typos"\n'
                 '[[rules]]\nname = "cloud"\nmatch = { stage = "bridge" }\nengines = ["Gemini", "local_hifi"]\n'
                 '[[rules]]\nmatch = { engine = "stabilty" }\nengines = ["local_hifi"]\n'
                 '[[rules]]\nmatch = {}\nengines = ["lite", "my-plugin"]\n')
    store = PolicyStore(tmp_path, include_builtins=False)
    assert store.errors == [] and "typos" in store  # loaded: an engine may be missing only for a while
    warnings = store.engine_warnings(BUILTIN_ENGINES)
    known = ", ".join(sorted(BUILTIN_ENGINES))
    assert warnings == [
        f"{path}: unknown engine 'Gemini' (did you mean 'gemini'?) in rule 1 ('cloud') engines: "
        f"no request is routed to it (known: {known})",
        f"{path}: unknown engine 'local_hifi' (did you mean 'local-hifi'?) in rule 1 ('cloud') engines, "
        f"rule 2 engines: no request is routed to it (known: {known})",
        f"{path}: unknown engine 'stabilty' (did you mean 'stability'?) in rule 2 match.engine: "
        f"no request is routed to it (known: {known})",
        f"{path}: unknown engine 'my-plugin' in rule 3 engines: no request is routed to it (known: {known})",
    ]
    # Known, 'stabilty' is what rule 2 matches on without listing it (see test_policy_warnings.py).
    assert store.engine_warnings([*BUILTIN_ENGINES, "Gemini", "local_hifi", "stabilty", "my-plugin"]) == [
        f"{path}: rule 2 matches requests for stabilty, which its engines (local_hifi) do not list: each such "
        "request is refused (engine not allowed here)"]


def test_a_private_rule_that_lists_only_engines_that_leave_the_machine_is_warned_about(tmp_path: Path) -> None:
    """It loaded without a word, and every request it matched was refused at routing."""
    path = write(tmp_path, "locked", 'name = "locked"\n'
                 '[[rules]]\nname = "secret"\nmatch = { stage = "bridge" }\n'
                 'engines = ["gemini", "fal"]\nprivate = true\n'
                 '[[rules]]\nmatch = { tags = { privacy = ["Local"] } }\nengines = ["openai", "my-plugin"]\n'
                 '[[rules]]\nmatch = { stage = "polish" }\nengines = ["gemini", "local-hifi"]\nprivate = true\n'
                 '[[rules]]\nmatch = { tags = { privacy = ["local", "cloud"] } }\nengines = ["openai"]\n'
                 '[[rules]]\nmatch = {}\nengines = ["lite"]\n')
    store = PolicyStore(tmp_path, include_builtins=False)
    leaving = ["gemini", "fal", "openai", "stability", "replicate", "comfyui", "a1111"]
    warnings = [w for w in store.engine_warnings(BUILTIN_ENGINES, leaving) if "unknown engine" not in w]
    assert warnings == [
        f"{path}: rule 1 ('secret') keeps what it routes on this machine, and every engine it lists (gemini, fal) "
        "sends data off it: each request it matches is refused",
        f"{path}: rule 2 keeps what it routes on this machine, and every engine it lists (openai) sends data off it: "
        "each request it matches is refused",
    ]  # rule 3 has a local engine, rule 4 also routes requests that may leave
    assert [w for w in store.engine_warnings(BUILTIN_ENGINES) if "unknown engine" not in w] == []


def test_the_readme_s_example_policy_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```toml\n# ORCH_POLICY_DIR/studio.toml\n", 1)[1].split("```", 1)[0]
    policy = load_policy_file(write(tmp_path, "studio", example))
    assert [rule.name for rule in policy.rules] == ["acme", "drafts", "big-finals", "near-budget", "farm", "fallback"]
    # Acme's drafts too: below the drafts rule, they were routed as anyone's, and a promotion
    # retagged "client": "other" left the machine.
    for stage in ("ideation", "bridge", "polish"):
        found = policy.match(facts(stage, tags={"client": "acme"}))
        assert found is not None and found[1].name == "acme" and found[1].keeps_local({})


def test_a_dangling_link_does_not_blind_the_watch_to_the_other_files(tmp_path: Path) -> None:
    """One broken symlink made every look at the folder fail, so no other process saw an edit."""
    write(tmp_path, "mine", GOOD.format(name="mine", description="v1"))
    (tmp_path / "old.toml").symlink_to(tmp_path / "gone.toml")
    store = PolicyStore(tmp_path)
    assert store.fingerprint() == store.loaded_fingerprint
    write(tmp_path, "mine", GOOD.format(name="mine", description="version two"))
    assert store.fingerprint() != store.loaded_fingerprint


def test_a_policy_file_with_an_upper_case_suffix_is_read(tmp_path: Path) -> None:
    # `studio.TOML` was skipped without a word: its projects were told the policy is unknown.
    (tmp_path / "studio.TOML").write_text(GOOD.format(name="studio", description="upper case"))
    store = PolicyStore(tmp_path)
    assert store.errors == [] and store.get("studio").description == "upper case"


def test_one_policy_in_two_files_is_refused_and_its_last_good_version_kept(tmp_path: Path) -> None:
    # `studio.toml` beside `studio.TOML` (a copy from another machine): one of them won, unsaid.
    write(tmp_path, "studio", GOOD.format(name="studio", description="lower"))
    store = PolicyStore(tmp_path)
    (tmp_path / "studio.TOML").write_text(GOOD.format(name="studio", description="upper"))
    errors = store.reload()
    assert [e.message for e in errors] == [
        f"{tmp_path}: policy 'studio' is in 2 files (studio.TOML, studio.toml); keep one"]
    assert store.get("studio").description == "lower"
    assert "studio" not in PolicyStore(tmp_path)  # a start with both has neither


def test_a_change_that_keeps_a_file_s_time_and_size_is_seen(tmp_path: Path) -> None:
    """A file made readable (chmod), or a folder of files of fixed times swapped for another (a Nix
    or image generation), kept each file's time and size: no process reloaded, and a project the
    new file made local-only went on sending to the cloud."""
    import os

    path = write(tmp_path, "mine", GOOD.format(name="mine", description="v1"))
    store = PolicyStore(tmp_path)
    before = path.stat()
    path.chmod(0o600)
    assert store.fingerprint() != store.loaded_fingerprint  # its change time
    store.reload()
    swapped = tmp_path / "next.toml"
    swapped.write_text(GOOD.format(name="mine", description="v2"))  # the same size
    os.utime(swapped, ns=(before.st_atime_ns, before.st_mtime_ns))
    swapped.rename(path)  # another inode under the same name, time and size
    assert store.fingerprint() != store.loaded_fingerprint


def test_the_shipped_policy_files_are_watched_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Edited in a checkout, they were reloaded only by a process asked to: the others kept the old rules.
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    write(shipped, "balanced", GOOD.format(name="balanced", description="v1"))
    monkeypatch.setattr("policies.loader.resources.files", lambda package: shipped if package == "policies" else None)
    store = PolicyStore(None)
    assert store.get("balanced").description == "v1" and store.fingerprint() == store.loaded_fingerprint
    write(shipped, "balanced", GOOD.format(name="balanced", description="version two"))
    assert store.fingerprint() != store.loaded_fingerprint
