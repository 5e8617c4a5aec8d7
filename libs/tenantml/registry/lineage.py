"""Whose data the serving models hold: each champion's recorded lineage, and its taint.

`io.lineage` records what every model version learned from; this module joins that to what is
serving now (each tenant's champion alias and the shared champion), so a person can ask "whose
rows does this model contain?" and "which serving models still contain this tenant's rows?".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tenantml.core.ids import SHARED_ID, validate_tenant_id
from tenantml.io.lineage import contributor_hash, read_lineage, taints
from tenantml.io.tenants import list_tenant_ids
from tenantml.registry.tracking import champion_versions, shared_champion

if TYPE_CHECKING:
    from tenantml.io.context import JobContext


@dataclass(frozen=True)
class ServingLineage:
    """One serving model: the tenant it serves (``_shared`` for the shared champion), its
    contributors (ids; erased ones counted apart) and why it is tainted, if it is."""

    tenant_id: str
    model: str
    strategy: str
    contributors: tuple[str, ...]
    erased: int
    rows: int
    tainted: str | None


def serving_models(ctx: JobContext, dataset: str) -> dict[str, tuple[str, str]]:
    """tenant -> (model name, version) of every champion now serving, the shared one included."""
    out = {t: (mv.name, str(mv.version)) for t, mv in
           champion_versions(ctx, dataset, list_tenant_ids(ctx.spark, ctx.tables.tenants)).items()}
    shared = shared_champion(ctx, dataset)
    if shared is not None:
        out[SHARED_ID] = (shared.name, str(shared.version))
    return out


def serving_lineage(ctx: JobContext, dataset: str,
                    serving: dict[str, tuple[str, str]] | None = None) -> list[ServingLineage]:
    """Every serving model with its contributors and taint (no lineage recorded: its own tenant only)."""
    from pyspark.sql import functions as F

    serving = serving_models(ctx, dataset) if serving is None else serving
    ref = ctx.tables.model_lineage
    df = read_lineage(ctx.spark, ref, list(serving.values()))
    rows: dict[tuple[str, str], list[tuple[str | None, int]]] = {}
    strategy: dict[tuple[str, str], str] = {}
    if df is not None:
        for r in df.select("model_name", "model_version", "strategy", "contributor", "rows").orderBy(
                F.col("contributor").asc_nulls_last()).collect():
            rows.setdefault((r["model_name"], r["model_version"]), []).append((r["contributor"], int(r["rows"] or 0)))
            strategy[(r["model_name"], r["model_version"])] = r["strategy"]
    bad = taints(ctx.spark, ref, ctx.tables.tenants, list(serving.values()), key=ctx.signing_key)
    out = []
    for t, key in sorted(serving.items()):
        contrib = rows.get(key, [])
        ids = tuple(str(c) for c, _ in contrib if c)
        out.append(ServingLineage(t, f"{key[0]}/{key[1]}", strategy.get(key, "unrecorded"), ids,
                                  sum(1 for c, _ in contrib if not c), sum(n for _, n in contrib),
                                  bad[key].describe() if key in bad else None))
    return out


def serving_models_with(ctx: JobContext, dataset: str, tenant_id: str) -> list[ServingLineage]:
    """The serving models (of other tenants, or the shared one) that still hold ``tenant_id``'s rows;
    found by keyed hash, so this answers for an offboarded tenant too. Empty once purged."""
    from pyspark.sql import functions as F

    tid = validate_tenant_id(tenant_id, where="the lineage lookup")
    serving = serving_models(ctx, dataset)
    df = read_lineage(ctx.spark, ctx.tables.model_lineage, list(serving.values()))
    if df is None:
        return []
    h = contributor_hash(ctx.signing_key, tid)
    holding = {(r["model_name"], r["model_version"]) for r in
               df.where(F.col("contributor_hash") == h).select("model_name", "model_version").distinct().collect()}
    return [s for s in serving_lineage(ctx, dataset, serving)
            if s.tenant_id != tid and tuple(s.model.rsplit("/", 1)) in holding]


__all__ = ["ServingLineage", "serving_lineage", "serving_models", "serving_models_with"]
