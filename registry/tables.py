"""Storage of the registry. Plain portable SQL: the same tables on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel


class AgentRow(SQLModel, table=True):
    __tablename__ = "agents"
    # Counting agents by status (metrics) reads this index alone, not the rows.
    __table_args__ = (Index("ix_agents_status_expiry", "check_status", "expires_at"),)

    agent_id: str = Field(primary_key=True, max_length=128)
    name: str = Field(max_length=128)
    tier: int = Field(index=True)
    locality: str = Field(max_length=16, index=True)
    role: str = Field(max_length=64, index=True)
    endpoint: str = Field(max_length=2048)
    transport: str = Field(max_length=64)
    cost_per_1k_tokens: float
    capabilities: list[str] = Field(sa_column=Column(JSON, nullable=False))
    # "metadata" is taken by SQLAlchemy's declarative base; the column keeps the API name.
    meta: dict[str, Any] = Field(sa_column=Column("metadata", JSON, nullable=False))
    ttl_seconds: float
    # schemas.agents.definition_fingerprint of the stored definition, answered with every
    # heartbeat: an agent whose record another registration replaced registers again.
    fingerprint: str = Field(max_length=64)
    # The agent's own check ("passing"/"warning"/"critical"); expiry overrides it.
    check_status: str = Field(max_length=16)
    output: str = Field(default="", max_length=1024)
    # The last heartbeat's schemas.agents.AgentLoad (SQL NULL: none reported), when it came,
    # and its expected wait apart, for discovery to sort by.
    load: dict[str, Any] | None = Field(
        default=None, sa_column=Column("load", JSON(none_as_null=True), nullable=True)
    )
    load_reported_at: float | None = None
    expected_wait_ms: float | None = None
    # Epoch seconds from the registry's clock.
    registered_at: float
    last_heartbeat: float
    expires_at: float = Field(index=True)


class CapabilityRow(SQLModel, table=True):
    """One row per (agent, capability): discovery is an indexed lookup, not a JSON scan.

    Each row repeats its agent's expected wait (``AgentRow.expected_wait_ms``), so that a
    capability's agents are read in order of wait from an index and discovery sorted by
    wait stops at its limit, as unsorted discovery does, instead of reading and sorting
    every agent that has the capability.
    """

    __tablename__ = "agent_capabilities"
    __table_args__ = (
        Index("ix_agent_capabilities_capability", "capability", "agent_id"),
        Index("ix_agent_capabilities_wait", "capability", "expected_wait_ms", "agent_id"),
    )

    # Removing an agent removes its rows in the same statement: the reaper's one DELETE.
    agent_id: str = Field(
        foreign_key="agents.agent_id", ondelete="CASCADE", primary_key=True, max_length=128
    )
    capability: str = Field(primary_key=True, max_length=64)
    expected_wait_ms: float | None = None


TABLES = [AgentRow.__table__, CapabilityRow.__table__]
