"""Routing policies: policy files validated at load, and a pure routing decision.

Never imports `gateway`, `adapters` or `budgets`; the gateway converts its config
and request state into `Candidate` and `Facts` and calls `choose`.
"""

from .engine import catalog_for_test, choose, facts_from_test, run_policy_tests
from .filters import FILTERS, Filter, all_of
from .model import (
    ALLOWED_BOUNDARIES,
    BOUNDARIES,
    CAPABILITIES,
    CIRCUIT_OPEN,
    DATA_CLASSES,
    OVER_BUDGET,
    Candidate,
    Decision,
    Facts,
    Rejected,
    max_data_class,
)
from .policy import (
    REQUESTED,
    CompiledPolicy,
    PolicyFile,
    PolicyTest,
    Require,
    Route,
    Shadow,
    SplitEntry,
    Weights,
    When,
    check_references,
    compile_policy,
    load_policies,
    load_policy,
    parse_policy,
)
from .rankers import RANKERS, Ranker
from .yamlsource import (
    SourceError,
    YamlDoc,
    error_at,
    line_for,
    load_yaml,
    parse_yaml,
    validate,
)

__all__ = [
    "ALLOWED_BOUNDARIES",
    "BOUNDARIES",
    "CAPABILITIES",
    "CIRCUIT_OPEN",
    "DATA_CLASSES",
    "FILTERS",
    "OVER_BUDGET",
    "RANKERS",
    "REQUESTED",
    "Candidate",
    "CompiledPolicy",
    "Decision",
    "Facts",
    "Filter",
    "PolicyFile",
    "PolicyTest",
    "Ranker",
    "Rejected",
    "Require",
    "Route",
    "Shadow",
    "SourceError",
    "SplitEntry",
    "Weights",
    "When",
    "YamlDoc",
    "all_of",
    "catalog_for_test",
    "check_references",
    "choose",
    "compile_policy",
    "error_at",
    "facts_from_test",
    "line_for",
    "load_policies",
    "load_policy",
    "load_yaml",
    "max_data_class",
    "parse_policy",
    "parse_yaml",
    "run_policy_tests",
    "validate",
]
