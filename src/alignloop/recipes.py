"""Recipes: TOML files validated by pydantic, plus `--set section.key=value` overrides.

A recipe is the whole configuration of a stage. Every mistake in one (a misspelt key, a wrong
type, a missing file) becomes a one-line `AlignloopError` naming the file and the key, so a
user never has to read a pydantic traceback to fix a typo.
"""

import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Tag, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from alignloop.errors import AlignloopError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every recipe section."""

    # A misspelt key silently falling back to its default is the worst kind of config bug. And no
    # number in a recipe is meant to be infinite or NaN: `lr = inf` passes `gt=0`, then training dies
    # steps later with a traceback and writes `Infinity` (not JSON) into metrics.jsonl.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _existing_file(path: Path, info: ValidationInfo) -> Path:
    # Next to the recipe first, so a recipe and its data can move together; then the working
    # directory, for paths typed on the command line.
    candidates = [path]
    if not path.is_absolute():
        base_dir = (info.context or {}).get("base_dir")
        candidates = [Path(base_dir) / path] if base_dir is not None else []
        candidates.append(Path.cwd() / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"file not found: {path}")


ExistingFile = Annotated[Path, AfterValidator(_existing_file)]
"""A path to a file that must exist; relative paths are looked up next to the recipe first."""


def load_recipe(path: str | Path, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Read the TOML recipe at `path`, apply `overrides` ("a.b.c=value"), validate with `schema`."""
    path = Path(path)
    if not path.is_file():
        raise AlignloopError(f"recipe not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AlignloopError(f"{path}: not valid TOML: {e}") from None

    overridden = [_apply_override(data, schema, item, path) for item in overrides]
    try:
        return schema.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as e:
        problems = [_describe(error, schema, overridden) for error in e.errors(include_url=False)]
        raise AlignloopError(f"{path}: " + "; ".join(problems)) from None


def recipe_to_dict(recipe: BaseModel) -> dict[str, Any]:
    """The resolved recipe as plain JSON data (paths as strings), for run manifests."""
    return recipe.model_dump(mode="json")


# --- overrides ---------------------------------------------------------------------------------


def _apply_override(data: dict[str, Any], schema: type[BaseModel], item: str, path: Path) -> tuple[str, ...]:
    """Set one `a.b.c=value` in the raw recipe data and return its key path."""
    key, sep, raw = item.partition("=")
    keys = tuple(part.strip() for part in key.split("."))
    if not sep or not all(keys):
        raise AlignloopError(f"--set {item}: expected section.key=value")
    raw = raw.strip()
    value = _parse_value(raw)

    # `--set model.name=123` means the text "123": the schema, not TOML, knows it is a name.
    fields = _fields_at(schema, keys[:-1])
    if fields and keys[-1] in fields and _wants_str(fields[keys[-1]]) and not isinstance(value, str):
        value = raw

    table = data
    for depth, part in enumerate(keys[:-1], start=1):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise AlignloopError(f"{path}: --set {item}: '{'.'.join(keys[:depth])}' is a value, not a table")
    # An unknown key is still set here: validation then reports it like one in the file.
    table[keys[-1]] = value
    return keys


def _parse_value(raw: str) -> Any:
    """A TOML value (3, 0.5, true, "x", [1, 2]) if `raw` is one, else `raw` as plain text."""
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    # Text like "1\nother = 2" parses as a document, not as one value.
    return parsed["value"] if parsed.keys() == {"value"} else raw


def _wants_str(field: FieldInfo) -> bool:
    annotation = field.annotation
    return annotation is str or str in _union_members(annotation)


# --- walking the schema ------------------------------------------------------------------------


def _union_members(annotation: Any) -> tuple[Any, ...]:
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if is_union else ()


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The model class in `Sub` or `Sub | None`, if any."""
    for candidate in (annotation, *_union_members(annotation)):
        if typing.get_origin(candidate) is None and isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _tagged_sections(annotation: Any) -> dict[str, type[BaseModel]]:
    """Tag -> section class of a discriminated union (`Annotated[A, Tag("a")] | ...`); {} for anything else."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    found = {}
    for member in _union_members(annotation):
        if typing.get_origin(member) is Annotated:
            cls, *meta = typing.get_args(member)
            found.update({m.tag: cls for m in meta if isinstance(m, Tag)})
    return found


def _resolve(schema: type[BaseModel], loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], type[BaseModel] | None]:
    """`loc` as the user wrote it, and the section it ends in (None where it leaves the known sections).

    pydantic puts a discriminated union's tag into the path ('env', 'arithmetic', 'reward'); the TOML
    has no such level ('env.reward'), so the tag is dropped and its section followed instead.
    """
    model: type[BaseModel] | None = schema
    keys: list[str | int] = []
    parts = list(loc)
    while parts:
        key = parts.pop(0)
        keys.append(key)
        field = model.model_fields.get(key) if model is not None and isinstance(key, str) else None
        model = _section_class(field.annotation) if field is not None else None
        tagged = _tagged_sections(field.annotation) if field is not None else {}
        if tagged and parts and parts[0] in tagged:
            model = tagged[parts.pop(0)]
    return tuple(keys), model


def _fields_at(schema: type[BaseModel], keys: Sequence[str | int]) -> dict[str, FieldInfo] | None:
    """The fields of the section at `keys`, or None where the path leaves the known sections."""
    model = _resolve(schema, keys)[1]
    return dict(model.model_fields) if model is not None else None


# --- pydantic errors as one line ---------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "path_type": "a path",
}


def _describe(error: ErrorDetails, schema: type[BaseModel], overridden: list[tuple[str, ...]]) -> str:
    loc, kind = _resolve(schema, error["loc"])[0], error["type"]
    key = _dotted(loc)
    if kind == "missing":
        text = f"missing required key '{key}'"
    elif kind == "extra_forbidden":
        fields = _fields_at(schema, error["loc"][:-1])
        known = f" (known: {', '.join(sorted(fields))})" if fields else ""
        text = f"unknown key '{key}'{known}"
    elif kind in ("value_error", "assertion_error"):
        # Our own validators (ExistingFile, ...) already say what they got.
        text = f"{key}: {error.get('ctx', {}).get('error', error['msg'])}"
    elif kind in _EXPECTED:
        text = f"{key}: expected {_EXPECTED[kind]}, got {_show(error['input'])}"
    else:
        msg, got = error["msg"], error["input"]
        if isinstance(got, dict) and msg.startswith("kind "):  # a section whose `kind` picks its fields
            key, got = f"{key}.kind", got.get("kind")
        text = f"{key}: {msg[:1].lower()}{msg[1:]}, got {_show(got)}"

    # Say so when the culprit came from the command line, or the user will hunt for it in the file.
    if any(loc[: len(keys)] == keys[: len(loc)] for keys in overridden):
        text += " (from --set)"
    return text


def _dotted(loc: tuple[str | int, ...]) -> str:
    """('data', 'files', 0) -> 'data.files[0]'"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML, near enough."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)
