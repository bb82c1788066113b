"""Every route the app has at run time, classified by what guards it (found by walking the
routes' dependency trees), so that a new route is tested, or refused until a case for it
is declared."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")


@dataclass(frozen=True)
class RouteInfo:
    method: str
    path: str
    params: tuple[str, ...]
    guards: frozenset[str]  # names of the dependencies it runs (get_principal, get_admin, ...)
    has_body: bool

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.path)

    @property
    def project_scoped(self) -> bool:
        return "get_principal" in self.guards

    @property
    def admin_only(self) -> bool:
        return "get_admin" in self.guards

    def url(self, values: dict[str, str]) -> str:
        return PARAM.sub(lambda m: values[m.group(1)], self.path)


def _dependency_names(dependant, out: set[str]) -> set[str]:
    for sub in getattr(dependant, "dependencies", []):
        out.add(getattr(sub.call, "__name__", repr(sub.call)))
        _dependency_names(sub, out)
    return out


def all_routes(app: FastAPI) -> list[RouteInfo]:
    found = []
    for ctx in iter_route_contexts(app.routes):
        path = ctx.path or ""
        dependant = getattr(ctx, "dependant", None)
        guards = frozenset(_dependency_names(dependant, set()) if dependant else ())
        has_body = bool(getattr(dependant, "body_params", None))
        methods = sorted(set(ctx.methods or {"GET"}) - {"HEAD"})  # a Mount has no methods
        for method in methods:
            found.append(RouteInfo(method, path, tuple(PARAM.findall(path)), guards, has_body))
    return found
