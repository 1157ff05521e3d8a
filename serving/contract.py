"""The contract the trainer writes and the server reads, defined once.

Imports nothing heavy (no torch, no numpy): both sides, and the base install, can use it.
"""

from __future__ import annotations

FREE = -1  # owner value of a unit that no task owns

# Names of the served ONNX graph's inputs and output.
INPUT_NAME = "input"  # float32 (batch, *input_shape): raw features, preprocessing is inside the graph
TASK_INPUT_NAME = "task"  # int64 (batch,): the task index of each row
OUTPUT_NAME = "scores"  # float32 (batch, max_classes): the row's task's class scores, zero-padded


def visible_to(owner, task_index: int):
    """The mask rule: where a task sees a unit. True where the unit's owner is a task <= `task_index`.

    `owner` is an int array or tensor of owners (numpy or torch; the comparison is elementwise).
    """
    return (owner >= 0) & (owner <= task_index)


def plan_share(free: int, plan_tasks: int, learned: int) -> int:
    """The units per layer the next task keeps under a plan of `plan_tasks` tasks when `learned` are learned and
    `free` units of the layer are FREE: an equal share of them, at least one (`plan_tasks` > `learned`)."""
    return max(1, free // (plan_tasks - learned))
