"""The README's list of error codes is the API's, both ways.

The codes are collected from the source of ``api/`` and ``shared/``: the first argument of every
call that makes an error (each ``shared.errors.DomainError`` class, ``api.errors.error_body``,
``api.safejson``'s ``_Refused``), followed through a local or module-level name, a conditional, a
dict and ``.get(key, default)``. A code built at run time (an f-string) is expanded from the calls
that feed it, or listed in ``DYNAMIC`` with why it never reaches a client; a code only the
``stylequeue`` tenant commands raise is in ``NOT_API``. Anything else the collector cannot follow
fails the test, so a new way of making a code has to be taught here rather than slip past.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from shared import errors
from tests.support import REPO

CALLS = {
    cls.__name__ for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, Exception)
}
CALLS |= {"error_body", "_Refused"}
NOT_API = {  # code -> why the API never answers it
    "ambiguous_key_prefix": "`stylequeue keys revoke/rotate` (shared/tenants.py)",
    "invalid_expiry": "`stylequeue keys create --expires-in`",
    "invalid_overlap": "`stylequeue keys rotate --overlap`",
    "key_not_active": "`stylequeue keys rotate` of a revoked or expired key",
    "unknown_key_prefix": "`stylequeue keys revoke/rotate`",
    "unknown_tenant": "`stylequeue keys list --tenant` / `tenants show`",
    "invalid_limit": "`stylequeue tenants set-limits`",
    "invalid_rate_limit": "`tenants set-limits --rate-limit`, or STYLEQUEUE_RATE_LIMIT read at start",
    "malformed_cursor": "api.queries.decode_cursor answers every bad cursor as invalid_cursor",
}
DYNAMIC = {  # a code built at run time -> why none of its values needs listing (None: expanded)
    "f'malformed_{what}'": None,  # api.safejson.loads: malformed_<what>, "the body" -> malformed_json
    "f'http_{exc.status_code}'": "a Starlette HTTPException of a status api.errors has no name for: none",
}
REPASSED = {"exc.code"}  # an error's code passed on (caught, then re-raised or rendered)


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for folder in ("api", "shared"):
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def _name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _assigned(node: ast.AST) -> dict[str, ast.expr]:
    return {
        t.id: n.value
        for n in ast.walk(node)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }


class Collector:
    def __init__(self) -> None:
        self.codes: set[str] = set()
        self.dynamic: set[str] = set()
        self.unfollowed: set[str] = set()
        self.malformed: set[str] = set()  # what= of api.safejson.loads and api.forms.json_field

    def strings(self, e: ast.expr, names: dict[str, ast.expr], depth: int = 0) -> set[str]:
        def follow(x: ast.expr) -> set[str]:
            return self.strings(x, names, depth + 1)

        if depth > 8:
            self.unfollowed.add(ast.unparse(e))
        elif isinstance(e, ast.Constant) and isinstance(e.value, str):
            return {e.value}
        elif isinstance(e, ast.Name) and e.id in names:
            return follow(names[e.id])
        elif isinstance(e, ast.IfExp):
            return follow(e.body) | follow(e.orelse)
        elif isinstance(e, ast.Dict):
            return set().union(*map(follow, e.values))
        elif isinstance(e, ast.Call) and _name(e.func) == "get" and isinstance(e.func, ast.Attribute):
            return follow(e.func.value).union(*map(follow, e.args[1:]))
        elif isinstance(e, ast.JoinedStr):
            self.dynamic.add(ast.unparse(e))
        else:
            self.unfollowed.add(ast.unparse(e))
        return set()

    def module(self, tree: ast.Module) -> None:
        module_names = {
            t.id: n.value
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            names = module_names | _assigned(fn)
            for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call)):
                name = _name(call.func)
                if name in CALLS and call.args:
                    self.codes |= self.strings(call.args[0], names)
                elif name == "loads" or (name == "json_field" and len(call.args) > 1):
                    what = (
                        call.args[1]
                        if name == "json_field"
                        else next((k.value for k in call.keywords if k.arg == "what"), None)
                    )
                    if fn.name != "json_field" and what is not None:  # json_field passes its caller's on
                        self.malformed |= self.strings(what, names)


def collected() -> Collector:
    found = Collector()
    for _, tree in _sources():
        found.module(tree)
    found.codes |= {"malformed_json" if w == "the body" else f"malformed_{w}" for w in found.malformed}
    return found


def readme_codes() -> set[str]:
    text = (REPO / "README.md").read_text()
    start = text.index("Errors are always")
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", text[start : text.index("\n\n", start)]))


def test_every_error_code_the_api_answers_is_in_the_readme() -> None:
    found = collected()
    assert found.unfollowed <= REPASSED, f"teach the collector these: {found.unfollowed - REPASSED}"
    assert found.dynamic == set(DYNAMIC), f"codes built at run time, explain them: {found.dynamic}"
    assert {
        "job_not_found",
        "invalid_parameter",
        "unknown_field",
        "not_found",
        "malformed_pairs",
    } <= found.codes
    api_codes = found.codes - set(NOT_API)
    missing = sorted(api_codes - readme_codes())
    assert not missing, f"README.md's errors list lacks {missing}"
    assert set(NOT_API) <= found.codes, f"NOT_API names codes no longer raised: {set(NOT_API) - found.codes}"


def test_the_readme_lists_no_code_that_does_not_exist() -> None:
    stale = sorted(readme_codes() - collected().codes)
    assert not stale, f"README.md's errors list names codes nothing raises: {stale}"


def test_the_collector_sees_a_new_code() -> None:
    found = Collector()
    found.module(
        ast.parse(
            'def f(x):\n    code = {"a": "new_code"}.get(x, "other_code")\n    raise NotFound(code, "m")'
        )
    )
    assert found.codes == {"new_code", "other_code"}
