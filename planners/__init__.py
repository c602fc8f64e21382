"""Pure planning for trainer->inference weight sync: numpy, pydantic and the standard library, no
process groups and no side effects (an import contract checked in CI keeps it so).

``models`` (what a model's tensors are, one module per family), ``layouts`` (both sides' parallel
layouts and the deployment), ``sides`` (what each rank of a trainer or engine holds), ``eplb`` (expert
placements), ``build``/``plan``/``validate``/``simulate``/``cost``/``bounds`` (the plan: built,
proven, run in memory, priced), ``schedule`` (how a plan's chunks travel: buckets, rounds, byte
runs), ``job`` (the YAML job spec and its validation), ``errors`` (every error, one base).
"""

from planners.build import build_plan, build_plan_from_parts
from planners.cost import Links
from planners.eplb.placement import EnginePlacements, Placement
from planners.errors import RLSyncError
from planners.job import EplbSettings, JobError, JobSpec, SyncSettings
from planners.layouts import Deployment, InferenceLayout, TrainerLayout
from planners.models import LogicalTensor, ModelSpec, catalog
from planners.plan import PlanError, SyncPlan

__all__ = [
    "JobSpec", "JobError", "SyncSettings", "EplbSettings", "build_plan", "build_plan_from_parts",
    "SyncPlan", "PlanError", "TrainerLayout", "InferenceLayout", "Deployment", "Links",
    "ModelSpec", "LogicalTensor", "catalog", "Placement", "EnginePlacements", "RLSyncError",
]
