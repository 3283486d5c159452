"""The process's thread policy, chosen once at start for every entry point (CLI, service, benchmarks).

Why: torch's CPU kernels run on an OpenMP team (libgomp). After each parallel region the team's idle threads
busy-wait ("spin") for a while before sleeping. On a CPU shared with other work, the model step of ``dhrclip
predict`` / ``evaluate`` / ``train`` then burns 5-10x the CPU time it needs, and slows every other process on the
machine, the service included (``bench/cli_threads.py`` measures it).

Policy ``passive`` (the default):

* ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep at once instead of spinning. libgomp reads the variable
  once, when torch loads it, so it must be in the environment *before* ``import torch``; that is why
  :func:`apply_thread_policy` runs when the ``service`` package is imported (``service/__init__.py``), before any
  module of ours imports torch. A value the user set is kept.
* intra-op threads: torch's own choice (one per physical core of the machine), left unchanged.

Policy ``default`` (``DHR_THREAD_POLICY=default``) leaves OpenMP as shipped; it exists so that benchmarks can
measure the difference in one run. Child processes inherit the environment, hence the same policy.

This module imports only the standard library (``dhrclip --help`` must not load torch).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from service.errors import UserError

POLICY_ENV = "DHR_THREAD_POLICY"
POLICIES = ("passive", "default")
WAIT_ENV = "OMP_WAIT_POLICY"


@dataclass(frozen=True)
class ThreadPolicy:
    """What was chosen: ``name`` (one of :data:`POLICIES`), the ``OMP_WAIT_POLICY`` in force (None: libgomp's
    default, spinning) and whether it can still act (``effective``: False when torch had already loaded OpenMP
    before the policy was applied, so a wait policy set then is ignored)."""

    name: str
    wait_policy: str | None
    effective: bool

    def describe(self) -> str:
        """One line for logs, e.g. ``threads: policy passive (OMP_WAIT_POLICY=PASSIVE), 2 intra-op threads``."""
        wait = f"OMP_WAIT_POLICY={self.wait_policy}" if self.wait_policy else "OpenMP default wait policy"
        line = f"threads: policy {self.name} ({wait})"
        if "torch" in sys.modules:
            line += f", {sys.modules['torch'].get_num_threads()} intra-op threads"
        if not self.effective:
            line += "; not in effect: torch was imported before the policy was applied"
        return line


_applied: ThreadPolicy | None = None


def apply_thread_policy() -> ThreadPolicy:
    """Apply the policy named by ``DHR_THREAD_POLICY`` (default ``passive``) once; later calls return the same object.

    An unknown name raises :class:`~service.errors.UserError` naming the variable and the accepted values (on every
    call, so that the entry point that calls it reports it as one line).
    """
    global _applied
    if _applied is not None:
        return _applied
    name = os.environ.get(POLICY_ENV, "passive").strip().lower() or "passive"
    if name not in POLICIES:
        raise UserError(f"{POLICY_ENV}={name!r}: expected one of {', '.join(POLICIES)}")
    torch_loaded = "torch" in sys.modules
    user_set = WAIT_ENV in os.environ
    if name == "passive" and not torch_loaded:
        os.environ.setdefault(WAIT_ENV, "PASSIVE")
    effective = name == "default" or user_set or not torch_loaded
    _applied = ThreadPolicy(name=name, wait_policy=os.environ.get(WAIT_ENV), effective=effective)
    return _applied


def applied_thread_policy() -> ThreadPolicy | None:
    """The policy applied in this process, or None before :func:`apply_thread_policy` ran."""
    return _applied
