"""Routing engine: pure functions of a message's header and business fields."""

from routing.config import DestinationConfig
from routing.engine import RoutingTable, default_rules_path
from routing.explain import Explanation, RuleTrace
from routing.rules import ConditionTrace

__all__ = [
    "ConditionTrace",
    "DestinationConfig",
    "Explanation",
    "RoutingTable",
    "RuleTrace",
    "default_rules_path",
]
