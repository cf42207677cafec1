"""--explain: the job's plan, from a dry run of the real pipeline (`processing.dry_run`, `plan.explain`).

The job runs with the real text encoders and the real processing and pipeline code, but with stand-ins for the UNet
and the VAE (`plan.stand_in_model`), so the plan printed (t_enc, sigmas, model calls, mask coverage, crop region,
seeds) is what a real run does; nothing is saved.
"""
from __future__ import annotations

from typing import Any

from ..plan import DryRun
from ..plan import explain as explain_plan
from ..processing import dry_run as processing_dry_run
from .jobs import Task, _open_inputs, make_processing


def dry_run(sd, values: dict[str, Any], task: Task, command: str = "img2img") -> DryRun:
    """The dry run of one CLI job (`values` from the flag table, `task` its input files)."""
    return processing_dry_run(make_processing(sd, values, command, *_open_inputs(task, values)))


def explain(sd, values: dict[str, Any], command: str, task: Task) -> str:
    """The plan of one job as text, with the input and output file names first."""
    header = []
    if task.init is not None:
        header.append(f"input: {task.init}" + (f" -> {', '.join(map(str, task.outputs))}" if task.outputs else ""))
    dry = dry_run(sd, values, task, command)
    header.append(f"checkpoint: {sd.path}")
    return explain_plan(dry, header)
