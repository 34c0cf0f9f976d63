"""Each tutorial runs in under two minutes of CPU, as the README promises.

nbmake's own limit is per cell and in wall-clock time, which a busy machine stretches (tutorial 05 once
hit its 300 s cell limit under a load of 4-19 on two cores). CPU time is what the notebook costs
whatever else the machine runs: the operating system's account of finished child processes
(``RUSAGE_CHILDREN``) is read before and after each notebook, which counts the notebook's kernel (it
ends with the notebook) and what the kernel waited for (kaleido's Chromium drawing the PNGs). A
notebook over :data:`CPU_BUDGET_S` fails with its figure; each notebook's figure is recorded in the
test report (``user_properties``: ``cpu_seconds``).
"""

from __future__ import annotations

import pytest

CPU_BUDGET_S = 120.0  # the README: "each under two minutes"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        import resource
    except ImportError:  # not on Windows: there is no such account there
        return (yield)
    if type(item).__name__ != "NotebookItem":  # nbmake's item: one per tutorial
        return (yield)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = yield
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    item.user_properties.append(("cpu_seconds", round(cpu, 1)))
    if cpu > CPU_BUDGET_S:
        pytest.fail(
            f"{item.name} took {cpu:.0f} s of CPU (kernel and its children), over the {CPU_BUDGET_S:.0f} s the "
            "README promises for a tutorial; make it lighter (smaller samples, fewer steps, a shipped result)",
            pytrace=False,
        )
    return result
