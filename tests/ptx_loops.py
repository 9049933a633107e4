"""Reading PTX for the "performance on paper" checks of the GPU kernels.

Not a test module: helpers for ``test_cuda_compile.py``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_LABEL = re.compile(r"^(\$\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$\w+);")
_LOAD = re.compile(r"\bld\.global(?:\.nc)?(?:\.v[24])?\.\w+\s+[^,]+,\s*\[(%rd\d+)")
_ADD = re.compile(r"\badd\.s64\s+(%rd\d+),\s*(%rd\d+),\s*(%rd\d+);")


@dataclass
class Loop:
    """An innermost loop of a PTX listing and what it does per element."""

    first: int
    last: int
    loads: int  # ld.global instructions in the body
    stores: int  # st.global
    shared_stores: int  # st.shared
    elements: int  # elements handled per iteration (see ``innermost_loops``)

    @property
    def loads_per_element(self) -> float:
        return self.loads / self.elements

    @property
    def stores_per_element(self) -> float:
        return self.stores / self.elements


def innermost_loops(ptx: str) -> list[Loop]:
    """Innermost loops (a label and the backward branches to it) that touch
    global memory.

    Loops are unrolled by the compiler, so the elements handled per iteration
    are counted from the body: the number of global stores (a gradient pass
    stores each element once), else of shared stores (a first pass that
    keeps the row in shared memory), else the number of loads from the most
    used base address (a first pass reads each logit once from one array).
    """
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
    extent = {}
    for j, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < j:
            head = labels[m.group(1)]
            extent[head] = max(extent.get(head, j), j)
    spans = sorted(extent.items())
    inner = [(a, b) for a, b in spans
             if not any(a < a2 <= b and (a2, b2) != (a, b) for a2, b2 in spans)]
    adds = {}
    for line in lines:
        m = _ADD.search(line)
        if m:
            adds[m.group(1)] = m.group(2)
    result = []
    for a, b in inner:
        body = lines[a:b + 1]
        text = "\n".join(body)
        loads = [m.group(1) for m in _LOAD.finditer(text)]
        stores = len(re.findall(r"\bst\.global", text))
        shared_stores = len(re.findall(r"\bst\.shared", text))
        if not loads and not stores:
            continue
        bases = Counter(adds.get(reg, reg) for reg in loads)
        elements = stores or shared_stores or max(bases.values())
        result.append(Loop(a, b, len(loads), stores, shared_stores, elements))
    return result
