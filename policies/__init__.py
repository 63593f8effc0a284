"""Routing policies: TOML files that say which engines serve which request.

`schema` holds the file format and its evaluation (pure); `loader` reads files into a
`PolicyStore`. The built-in policies are the `*.toml` files next to this module.
"""

from policies.loader import BUILTIN, PolicyError, PolicyStore, Seen, SharedVersions, load_policy_file, parse_policy
from policies.schema import Match, Policy, RequestFacts, Rule, Strategy, is_private, order_candidates

__all__ = [
    "BUILTIN",
    "Match",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "RequestFacts",
    "Rule",
    "Seen",
    "SharedVersions",
    "Strategy",
    "is_private",
    "load_policy_file",
    "order_candidates",
    "parse_policy",
]
