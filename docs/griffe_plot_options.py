"""A griffe extension for the API pages: a result's ``plot(**kwargs)`` lists the options it passes on.

``LensResult.plot(**kwargs)`` hands its keyword arguments to a figure function
(:func:`tl_logitlens.plotting.lens_heatmap`); its signature alone says nothing of ``color=``,
``max_positions=`` or ``zmin=``. For every ``plot*`` method whose docstring names figure functions
(``:func:`tl_logitlens.plotting...```), this appends an "Other Parameters" section built from those
functions' own signatures (name, type, default, and which function takes it), so the page lists every
option and cannot drift from the code.
"""

from __future__ import annotations

import re

import griffe

_REF = re.compile(r":func:`~?(tl_logitlens\.plotting(?:\.\w+)+)`")


def _classes(obj: griffe.Object):
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_class:
            yield member
        if member.is_module or member.is_class:
            yield from _classes(member)


class PlotOptions(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for cls in _classes(pkg):
            for name, method in cls.members.items():
                if not name.startswith("plot") or method.is_alias or not method.is_function:
                    continue
                takes_kwargs = any(p.kind is griffe.ParameterKind.var_keyword for p in method.parameters)
                if method.docstring is None or not takes_kwargs:
                    continue
                self._add_options(pkg, method)

    @staticmethod
    def _add_options(pkg: griffe.Module, method: griffe.Function) -> None:
        own = {p.name for p in method.parameters}
        options: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        for path in dict.fromkeys(_REF.findall(method.docstring.value)):
            target = pkg[path.removeprefix("tl_logitlens.")]
            target = target.final_target if target.is_alias else target
            for p in list(target.parameters)[1:]:  # the first is the result itself
                if p.name in own or p.kind in (griffe.ParameterKind.var_positional, griffe.ParameterKind.var_keyword):
                    continue
                options.setdefault(p.name, (str(p.annotation or ""), []))[1].append((target.name, str(p.default)))
        if not options:
            return
        lines = ["", "", "Other Parameters:"]
        for name, (kind, takers) in options.items():
            typed = f"{name} ({kind})" if kind else name
            defaults = {default for _, default in takers}
            if len(defaults) == 1:
                where = f"default ``{takers[0][1]}``; passed on to {', '.join(f'``{f}``' for f, _ in takers)}"
            else:
                where = "passed on to " + ", ".join(f"``{f}`` (default ``{d}``)" for f, d in takers)
            lines.append(f"    {typed}: {where}.")
        method.docstring.value = method.docstring.value.rstrip() + "\n".join(lines)
