"""Agent trajectories: deterministic sandboxed tools (``tools.py``) and the loop that harvests a
teacher's multi-turn tool use as records (``trajectories.py``)."""

from distillscope.agent.tools import Toolbox, ToolError, default_toolbox
from distillscope.agent.trajectories import (
    Task,
    TrajectoryManifest,
    harvest_trajectories,
    load_tasks,
    parse_tool_choice,
    run_trajectory,
)

__all__ = [
    "Task",
    "ToolError",
    "Toolbox",
    "TrajectoryManifest",
    "default_toolbox",
    "harvest_trajectories",
    "load_tasks",
    "parse_tool_choice",
    "run_trajectory",
]
