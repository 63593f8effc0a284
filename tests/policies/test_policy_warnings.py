"""What a policy store says about a directory it cannot list, and about rules that load but never
apply or fail every request they route."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policies import Policy, PolicyStore
from policies.schema import Match
from tiers.registry import BUILTIN as BUILTIN_ENGINES

# As the built-in engines declare them (`tiers.*.stages`).
STAGES = {name: {"ideation"} if name == "lite" else {"bridge", "polish"} for name in BUILTIN_ENGINES}
LEAVING = sorted(set(BUILTIN_ENGINES) - {"lite", "local-hifi"})
BUILTINS = ("balanced", "local-only", "cloud-first", "budget-saver")

STUDIO = 'name = "studio"\n[[rules]]\nmatch = {}\nengines = ["local-hifi"]\nprivate = true\n'


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def toml(name: str, *rules: str) -> str:
    return f'name = "{name}"\n' + "".join(f"[[rules]]\n{rule}\n" for rule in rules)


# --- a directory that cannot be listed -----------------------------------------------------------

@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[Path]]:
    """The directories put in the set cannot be opened, as one without the read permission (the
    tests run as root, whom chmod does not stop)."""
    shut: set[Path] = set()
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path) in shut:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    yield shut


def test_an_unreadable_policy_directory_is_refused_at_start(tmp_path: Path, unreadable: set[Path]) -> None:
    """`Path.glob` found nothing in it: the service started without its policies, without a word."""
    write(tmp_path, "studio", STUDIO)
    unreadable.add(tmp_path)
    store = PolicyStore(tmp_path)
    assert [e.message for e in store.errors] == [f"{tmp_path}: cannot list the policy directory: Permission denied"]
    assert store.errors[0].file == str(tmp_path)
    assert "studio" not in store and "balanced" in store


def test_an_unreadable_policy_directory_keeps_its_policies_on_reload(tmp_path: Path, unreadable: set[Path]) -> None:
    write(tmp_path, "studio", STUDIO)
    write(tmp_path, "balanced", STUDIO.replace("studio", "balanced"))  # overrides the built-in
    store = PolicyStore(tmp_path)
    mine = {name: store.get(name) for name in ("studio", "balanced")}
    unreadable.add(tmp_path)
    # A watching process sees a change, so it reloads, tells, and keeps what it had.
    assert store.fingerprint() != store.loaded_fingerprint
    errors = store.reload()
    assert [e.message for e in errors] == [f"{tmp_path}: cannot list the policy directory: Permission denied"]
    assert {name: store.get(name) for name in mine} == mine and store.get("balanced").source != "builtin"
    assert store.fingerprint() == store.loaded_fingerprint  # told once, not at every look
    unreadable.clear()
    assert store.fingerprint() != store.loaded_fingerprint
    assert store.reload() == [] and store.get("studio") is not mine["studio"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a directory whatever its mode")
def test_a_directory_without_read_permission(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    write(folder, "studio", STUDIO)
    store = PolicyStore(folder)
    folder.chmod(0)
    try:
        errors = store.reload()
    finally:
        folder.chmod(0o755)
    assert len(errors) == 1 and "cannot list the policy directory" in errors[0].message and "studio" in store


def test_a_missing_directory_is_still_told_as_missing(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "gone")
    assert [e.message for e in store.errors] == [f"{tmp_path / 'gone'}: policy directory not found"]
    assert store.fingerprint() == store.loaded_fingerprint
    (tmp_path / "gone").mkdir()
    assert store.fingerprint() != store.loaded_fingerprint


# --- rules an earlier rule shadows -----------------------------------------------------------------

GAPS = toml(
    "gaps",
    'name = "drafts"\nmatch = { stage = "ideation" }\nengines = ["lite"]',
    'name = "bridge"\nmatch = { stage = ["bridge", "polish"] }\nengines = ["gemini", "local-hifi"]',
    'name = "acme-bridge"\nmatch = { stage = "bridge", tags = { client = "acme" } }\nengines = ["local-hifi"]\n'
    "private = true",
    'name = "fallback"\nmatch = {}\ndeny = "no"',
)


def test_a_private_rule_after_a_broader_one_is_warned_about(tmp_path: Path) -> None:
    """Acme's bridge work went to the cloud, and the file loaded without a word."""
    path = write(tmp_path, "gaps", GAPS)
    store = PolicyStore(tmp_path, include_builtins=False)
    assert store.errors == [] and "gaps" in store  # loaded: a warning, not a refusal
    assert store.engine_warnings(BUILTIN_ENGINES, LEAVING, STAGES) == [
        f"{path}: rule 3 ('acme-bridge') never applies: rule 2 ('bridge'), before it, matches every request it "
        "matches; what it would keep on this machine goes to that rule's engines, which may send it off"]


def test_a_size_threshold_under_every_request_s_size_shadows_what_follows(tmp_path: Path) -> None:
    path = write(tmp_path, "sizes", toml(
        "sizes",
        'name = "any-width"\nmatch = { width_over = 0 }\nengines = ["lite", "local-hifi"]',
        'name = "big"\nmatch = { stage = "polish", height_over = 2048 }\nengines = ["local-hifi"]',
        'match = {}\ndeny = "no"'))
    store = PolicyStore(tmp_path, include_builtins=False)
    assert store.errors == []
    assert store.engine_warnings(BUILTIN_ENGINES, LEAVING, STAGES) == [
        f"{path}: rule 2 ('big') never applies: rule 1 ('any-width'), before it, matches every request it matches",
        f"{path}: rule 3 never applies: rule 1 ('any-width'), before it, matches every request it matches; what "
        "it would refuse is routed by that rule instead"]


def test_the_builtins_and_the_readme_example_are_not_warned_about(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    write(tmp_path, "studio", readme.split("```toml\n# ORCH_POLICY_DIR/studio.toml\n", 1)[1].split("```", 1)[0])
    store = PolicyStore(tmp_path)
    assert store.errors == [] and {*BUILTINS, "studio"} <= set(store.names())
    assert all(policy.shadowed() == [] for policy in store.list())
    assert store.engine_warnings(BUILTIN_ENGINES, LEAVING, STAGES) == []


@pytest.mark.parametrize(("earlier", "later", "covers"), [
    ({"stage": ["bridge", "polish"]}, {"stage": "bridge"}, True),
    ({"stage": ["bridge", "polish"]}, {"stage": ["bridge", "ideation"]}, False),
    ({"stage": "bridge"}, {}, False),
    ({"stage": ["bridge", "polish"]}, {"stage": "bridge", "tags": {"client": "acme"}}, True),
    ({"tags": {"client": ["acme", "beta"]}}, {"tags": {"client": "acme", "team": "x"}}, True),
    ({"tags": {"client": "acme"}}, {"tags": {"client": ["acme", "beta"]}}, False),
    ({"tags": {"client": "acme"}}, {"tags": {"team": "acme"}}, False),
    ({"tags": {"client": "acme"}}, {}, False),
    ({"tags": {"client": "acme"}}, {"tags": {"client": "Acme"}}, False),  # other tags' values are exact
    ({"tags": {"privacy": "local"}}, {"tags": {"Privacy": " Local "}}, True),  # the privacy tag's are not
    ({"engine": ["gemini", "openai"]}, {"engine": "gemini"}, True),
    ({"engine": "gemini"}, {}, False),  # a request that lets the policy choose fits no `engine`
    ({"engine": "gemini"}, {"engine": ["gemini", "openai"]}, False),
    ({"width_over": 512}, {"width_over": 1024}, True),
    ({"width_over": 512}, {"width_over": 512}, True),
    ({"width_over": 1024}, {"width_over": 512}, False),
    ({"width_over": 512}, {}, False),
    ({"width_over": 512}, {"height_over": 1024}, False),
    ({"width_over": 0}, {}, True),  # every request is at least 8 pixels a side
    ({"width_over": 7}, {"stage": "polish"}, True),
    ({"width_over": 8}, {}, False),
    ({"height_over": 0}, {"width_over": 100}, True),
    ({"height_over": 2048}, {"height_over": 4096, "stage": "polish"}, True),
    ({"budget_used_over": 0.5}, {"budget_used_over": 0.9}, True),
    ({"budget_used_over": 0.9}, {"budget_used_over": 0.5}, False),
    ({"budget_used_over": 0.0}, {}, False),  # a project without a budget limit fits none
    ({"stage": "bridge", "engine": "gemini"}, {"stage": "bridge"}, False),
    ({}, {"stage": "bridge"}, True),
])
def test_what_covers_what(earlier: dict[str, Any], later: dict[str, Any], covers: bool) -> None:
    assert Match.model_validate(earlier).covers(Match.model_validate(later)) is covers


def test_a_key_that_cannot_be_compared_never_covers(monkeypatch: pytest.MonkeyPatch) -> None:
    from policies import schema

    monkeypatch.delitem(schema._COVERS, "width_over")
    assert not Match.model_validate({"width_over": 0}).covers(Match.model_validate({"width_over": 100}))


def test_the_first_covering_rule_is_named() -> None:
    policy = Policy.model_validate({"name": "t", "rules": [
        {"match": {"tags": {"client": "acme"}}, "engines": ["lite"]},
        {"match": {"stage": "bridge"}, "engines": ["lite"]},
        {"match": {"stage": "bridge", "tags": {"client": "acme"}}, "engines": ["lite"]},
        {"match": {"stage": "bridge"}, "deny": "no"},
        {"match": {}, "engines": ["lite"]},
    ]})
    assert policy.shadowed() == [(3, 1), (4, 2)]


def test_shadowing_found_by_look_up_is_what_comparing_every_pair_finds() -> None:
    """`shadowed` looks rules up by their tags rather than compare every pair (2,000 rules, one per
    client, took 18 s a `GET /v1/policies`): on random policies it finds what every pair would."""
    import random

    chance = random.Random(20261202)

    def match() -> dict[str, Any]:
        given: dict[str, Any] = {}
        if chance.random() < 0.3:
            given["stage"] = chance.sample(["ideation", "bridge", "polish"], chance.randint(1, 2))
        tags = {key: chance.sample(["a", "b", "c"], chance.randint(1, 2))
                for key in chance.sample(["client", "team", "privacy"], chance.randint(0, 2))}
        if tags:
            given["tags"] = tags
        if chance.random() < 0.2:
            given["engine"] = chance.sample(["lite", "gemini"], chance.randint(1, 2))
        if chance.random() < 0.2:
            given["width_over"] = chance.choice([0, 512, 1024])
        if chance.random() < 0.1:
            given["budget_used_over"] = chance.choice([0.5, 0.9])
        return given or {"stage": ["bridge"]}

    shadowing = 0
    for _ in range(200):
        rules = [{"match": match(), "engines": ["lite"]} for _ in range(chance.randint(2, 12))]
        policy = Policy.model_validate({"name": "t", "rules": rules})
        every_pair = []
        for i, rule in enumerate(policy.rules, start=1):
            j = next((j for j, earlier in enumerate(policy.rules[:i - 1], start=1) if earlier.match.covers(rule.match)),
                     None)
            if j is not None:
                every_pair.append((i, j))
        assert policy.shadowed() == every_pair, rules
        shadowing += bool(every_pair)
    assert shadowing > 50  # the policies have rules to find


def test_rules_sharing_a_tag_are_looked_up_by_the_tag_they_differ_by(monkeypatch: pytest.MonkeyPatch) -> None:
    """Looked up by their first key, 4,000 rules `{ account = "studio", client = "cK" }` were each
    compared with every rule before: a `GET /v1/policies` took 5 s, a reload 17 s."""
    from policies import schema

    compared = 0
    covers = schema._covers

    def counted(a: Any, b: Any) -> bool:
        nonlocal compared
        compared += 1
        return covers(a, b)

    monkeypatch.setattr(schema, "_covers", counted)
    rules = [{"match": {"tags": {"account": "studio", "client": f"c{k}"}}, "engines": ["lite"]} for k in range(2000)]
    rules.append({"match": {"tags": {"account": "studio", "client": "c7"}, "stage": "bridge"}, "engines": ["lite"]})
    policy = Policy.model_validate({"name": "t", "rules": rules})
    assert policy.shadowed() == [(2001, 8)]
    assert compared < 10


# --- rules that fail every request they route --------------------------------------------------------

def test_rules_whose_engines_serve_none_of_their_stages_are_warned_about(tmp_path: Path) -> None:
    path = write(tmp_path, "stages", toml(
        "stages",
        'name = "drafts"\nmatch = { stage = "ideation" }\nengines = ["local-hifi", "gemini"]',
        'name = "asked"\nmatch = { engine = "lite", tags = { client = "acme" } }\nengines = ["lite", "local-hifi"]',
        'name = "mixed"\nmatch = { stage = "bridge", tags = { client = "beta" } }\nengines = ["lite", "local-hifi"]',
        'name = "plugin"\nmatch = { stage = "bridge", tags = { client = "gamma" } }\nengines = ["lite", "my-plugin"]',
        'name = "finals"\nmatch = { stage = ["bridge", "polish"] }\nengines = ["lite"]',
        'name = "part"\nmatch = { stage = ["ideation", "bridge"], tags = { client = "delta" } }\nengines = ["lite"]',
        'name = "any"\nmatch = { tags = { client = "eps" } }\nengines = ["lite"]',
        'match = {}\ndeny = "no"'))
    store = PolicyStore(tmp_path, include_builtins=False)
    known = [*BUILTIN_ENGINES, "my-plugin"]  # known, but its stages are not told: not judged
    assert store.engine_warnings(known, LEAVING, STAGES) == [
        f"{path}: rule 1 ('drafts') matches ideation requests, and none of its engines (local-hifi, gemini) serves "
        "that stage: each request it matches is refused",
        f"{path}: rule 5 ('finals') matches bridge, polish requests, and none of its engines (lite) serves any of "
        "these stages: each request it matches is refused",
        f"{path}: rule 6 ('part') matches bridge requests too, and none of its engines (lite) serves that stage: "
        "each such request that reaches it is refused",
    ]  # rule 2 matches only requests for lite, of any stage: its ideation ones are served; rule 7
    # lists no stage: its bridge and polish requests may all be taken by the rules before it
    # Without the engines' stages, nothing is said about them.
    assert store.engine_warnings(known, LEAVING) == []


def test_a_requested_engine_the_rule_does_not_list_is_warned_about(tmp_path: Path) -> None:
    """A request naming 'gemini' matched the rule, and was refused: 'not allowed here'."""
    path = write(tmp_path, "asked", toml(
        "asked",
        'name = "want-gemini"\nmatch = { engine = ["gemini", "openai"] }\nengines = ["openai", "local-hifi"]',
        'name = "refused"\nmatch = { engine = "stability" }\ndeny = "not here"',
        'name = "typo"\nmatch = { engine = "Gemini" }\nengines = ["gemini"]',
        'match = {}\nengines = ["lite"]'))
    store = PolicyStore(tmp_path, include_builtins=False)
    warnings = [w for w in store.engine_warnings(BUILTIN_ENGINES, LEAVING, STAGES) if "unknown engine" not in w]
    assert warnings == [
        f"{path}: rule 1 ('want-gemini') matches requests for gemini, which its engines (openai, local-hifi) do "
        "not list: each such request is refused (engine not allowed here)",
    ]  # a deny rule refuses them on purpose; an unknown name is refused before any rule, and told as unknown
