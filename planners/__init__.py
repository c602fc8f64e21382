"""Pure planning for trainer->inference weight sync: layouts, model catalogs, shard rules, plans.

No process groups and no side effects: everything here is numpy and the standard library.
"""

from planners.build import build_plan, build_plan_from_parts
from planners.cost import Links
from planners.job import EplbSettings, JobError, JobSpec, SyncSettings
from planners.layouts import Deployment, InferenceLayout, TrainerLayout
from planners.models import LogicalTensor, ModelSpec, catalog
from planners.eplb.placement import Placement
from planners.plan import PlanError, SyncPlan

__all__ = [
    "JobSpec", "JobError", "SyncSettings", "EplbSettings", "build_plan", "build_plan_from_parts",
    "SyncPlan", "PlanError", "TrainerLayout", "InferenceLayout", "Deployment", "Links",
    "ModelSpec", "LogicalTensor", "catalog", "Placement",
]
