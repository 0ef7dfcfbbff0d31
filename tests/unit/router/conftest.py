"""The routing rules of ROUTING.md section 1, loaded from the spec's own JSON example."""

from __future__ import annotations

import pytest

from services.runtime.settings import RoutingRules, load_routing_rules
from tests.unit.router.messages import SPEC_EXAMPLE


@pytest.fixture(scope="session")
def rules() -> RoutingRules:
    return load_routing_rules(SPEC_EXAMPLE)
