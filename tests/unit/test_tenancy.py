"""Tenant ids are data: only safe ones reach paths, predicates and model names."""

from __future__ import annotations

import pytest

from tenantml.core.errors import InvalidTenantIdError
from tenantml.core.ids import is_valid_tenant_id, model_name, tenant_in_predicate, validate_tenant_id

HOSTILE = ["", " ", "bad tenant", "../etc", "..", "a/b", "a\\b", "x'; DROP TABLE t; --", 'q"q',
           "t\n1", "é", "-lead", "a" * 65, None, 42]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_ids_are_refused(value: object) -> None:
    assert not is_valid_tenant_id(value)
    with pytest.raises(InvalidTenantIdError, match="invalid tenant id"):
        validate_tenant_id(value, where="a test")


@pytest.mark.parametrize("value", ["t001", "ACME", "acme-eu_2", "a" * 64, "0"])
def test_safe_ids_pass(value: str) -> None:
    assert validate_tenant_id(value) == value


def test_predicate_quotes_validated_ids_only() -> None:
    assert tenant_in_predicate(["b", "a", "a"]) == "tenant_id IN ('a', 'b')"
    with pytest.raises(InvalidTenantIdError):
        tenant_in_predicate(["a", "x' OR '1'='1"])
    with pytest.raises(ValueError, match="unsafe column"):
        tenant_in_predicate(["a"], column="tenant_id; DROP")


def test_model_names_validate_tenant() -> None:
    assert model_name("", "demo", "t1") == "demo__t1"
    with pytest.raises(InvalidTenantIdError):
        model_name("", "demo", "../t1")
