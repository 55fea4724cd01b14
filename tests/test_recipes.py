import json
import math
from pathlib import Path
from typing import Annotated, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Discriminator, Tag

from alignloop.errors import AlignloopError
from alignloop.recipes import ExistingFile, Section, load_recipe, recipe_to_dict


class Model(Section):
    name: str
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_tokens: int = 256


class Optim(Section):
    beta1: float = 0.9


class Train(Section):
    lr: float = 1e-3
    shuffle: bool = True
    tags: list[str] = []
    optim: Optim = Optim()


class Data(Section):
    path: ExistingFile
    note: str | None = None


class Recipe(Section):
    model: Model
    train: Train = Train()
    data: Data | None = None


GOOD = """
[model]
name = "smollm2-135m"

[train]
lr = 0.01
"""

fixture_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)


def write(tmp_path: Path, text: str, name: str = "recipes/x.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] = []) -> str:
    with pytest.raises(AlignloopError) as info:
        load_recipe(path, Recipe, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_loads_and_fills_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD), Recipe)
    assert recipe.model.name == "smollm2-135m"
    assert recipe.model.max_tokens == 256
    assert recipe.train.lr == 0.01
    assert recipe.data is None


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\nnmae = "x"\nname = "y"\n')
    assert error_of(path) == f"{path}: unknown key 'model.nmae' (known: dtype, max_tokens, name)"


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "[trian]\nlr = 1\n")
    assert error_of(path) == f"{path}: unknown key 'trian' (known: data, model, train)"


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\nname = "x"\nmax_tokens = "abc"\n')
    assert error_of(path) == f"{path}: model.max_tokens: expected an integer, got 'abc'"


def test_wrong_literal_names_choices(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\nname = "x"\ndtype = "fp8"\n')
    message = error_of(path)
    assert message.startswith(f"{path}: model.dtype: ")
    assert "'float32'" in message and "'bfloat16'" in message and "got 'fp8'" in message


def test_section_given_as_value(tmp_path: Path) -> None:
    path = write(tmp_path, 'model = "x"\n')
    assert error_of(path) == f"{path}: model: expected a table, got 'x'"


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nmax_tokens = 3\n")
    assert error_of(path) == f"{path}: missing required key 'model.name'"


def test_several_errors_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nmax_tokens = 2.5\n[train]\nshuffle = 3\n")
    message = error_of(path)
    assert message == (
        f"{path}: missing required key 'model.name'; model.max_tokens: expected an integer, got 2.5; "
        "train.shuffle: expected true or false, got 3"
    )


def test_missing_recipe(tmp_path: Path) -> None:
    path = tmp_path / "recipes" / "nope.toml"
    assert error_of(path) == f"recipe not found: {path}"


def test_bad_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[model\nname = 1\n")
    assert error_of(path).startswith(f"{path}: not valid TOML: ")


@pytest.mark.parametrize("item", ["foo", "model.name", "=3", "model..name=3", ".name=3", "model.=3"])
def test_bad_override_syntax(tmp_path: Path, item: str) -> None:
    assert error_of(write(tmp_path, GOOD), [item]) == f"--set {item}: expected section.key=value"


def test_override_nested_key(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD), Recipe, ["train.optim.beta1=0.95", "model.max_tokens=7"])
    assert recipe.train.optim.beta1 == 0.95
    assert recipe.model.max_tokens == 7
    assert recipe.train.lr == 0.01  # siblings in the file are kept


def test_override_creates_missing_section(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "[model]\nname = 'x'\n"), Recipe, ["train.shuffle=false"])
    assert recipe.train.shuffle is False


def test_later_override_wins(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD), Recipe, ["model.max_tokens=1", "model.max_tokens=2"])
    assert recipe.model.max_tokens == 2


def test_override_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert error_of(path, ["model.nmae=x"]) == (
        f"{path}: unknown key 'model.nmae' (known: dtype, max_tokens, name) (from --set)"
    )
    assert error_of(path, ["nope.x=1"]) == f"{path}: unknown key 'nope' (known: data, model, train) (from --set)"


def test_override_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert error_of(path, ["model.max_tokens=abc"]) == (
        f"{path}: model.max_tokens: expected an integer, got 'abc' (from --set)"
    )


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert error_of(path, ["model.name.x=1"]) == (
        f"{path}: --set model.name.x=1: 'model.name' is a value, not a table"
    )


def test_override_value_typing(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, Recipe, ["train.lr=3", "train.shuffle=false", 'train.tags=["a", "b"]'])
    assert recipe.train.lr == 3.0
    assert recipe.train.shuffle is False
    assert recipe.train.tags == ["a", "b"]
    # Not TOML: taken as plain text. A TOML string: unquoted.
    assert load_recipe(path, Recipe, ["model.name=gpt-2 small"]).model.name == "gpt-2 small"
    assert load_recipe(path, Recipe, ['model.name="q"']).model.name == "q"
    # A string field keeps the text even where it would parse as a number or bool.
    assert load_recipe(path, Recipe, ["model.name=123"]).model.name == "123"
    assert load_recipe(path, Recipe, ["model.name=true"]).model.name == "true"
    # ... and so does an optional string field.
    (path.parent / "d.jsonl").write_text("")
    recipe = load_recipe(path, Recipe, ["data.path=d.jsonl", "data.note=1.5"])
    assert recipe.data is not None and recipe.data.note == "1.5"


@fixture_settings
@given(value=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int_override_round_trips(tmp_path: Path, value: int) -> None:
    recipe = load_recipe(write(tmp_path, GOOD), Recipe, [f"model.max_tokens={value}"])
    assert recipe.model.max_tokens == value


@fixture_settings
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_float_override_round_trips(tmp_path: Path, value: float) -> None:
    recipe = load_recipe(write(tmp_path, GOOD), Recipe, [f"train.lr={value!r}"])
    assert recipe.train.lr == value and math.copysign(1, recipe.train.lr) == math.copysign(1, value)


@fixture_settings
@given(value=st.booleans())
def test_bool_override_round_trips(tmp_path: Path, value: bool) -> None:
    recipe = load_recipe(write(tmp_path, GOOD), Recipe, [f"train.shuffle={str(value).lower()}"])
    assert recipe.train.shuffle is value


@fixture_settings
@given(value=st.text(st.characters(blacklist_categories=("Cs", "Cc"))))
def test_quoted_string_override_round_trips(tmp_path: Path, value: str) -> None:
    # A JSON string with only printable characters is also a TOML basic string.
    quoted = json.dumps(value, ensure_ascii=False)
    recipe = load_recipe(write(tmp_path, GOOD), Recipe, [f"model.name={quoted}"])
    assert recipe.model.name == value


@fixture_settings
@given(value=st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans()))
def test_string_field_keeps_number_text(tmp_path: Path, value: int | float | bool) -> None:
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    recipe = load_recipe(write(tmp_path, GOOD), Recipe, [f"model.name={text}"])
    assert recipe.model.name == text


def test_existing_file_next_to_recipe_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD + '[data]\npath = "d.jsonl"\n')
    (path.parent / "d.jsonl").write_text("near")
    (tmp_path / "d.jsonl").write_text("cwd")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path, Recipe)
    assert recipe.data is not None
    assert recipe.data.path == (path.parent / "d.jsonl").resolve()


def test_existing_file_falls_back_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD + '[data]\npath = "d.jsonl"\n')
    (tmp_path / "d.jsonl").write_text("cwd")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path, Recipe)
    assert recipe.data is not None and recipe.data.path == (tmp_path / "d.jsonl").resolve()


def test_existing_file_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, GOOD + '[data]\npath = "nope.jsonl"\n')
    assert error_of(path) == f"{path}: data.path: file not found: nope.jsonl"


def test_recipe_to_dict_is_json_ready(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + '[data]\npath = "d.jsonl"\n')
    (path.parent / "d.jsonl").write_text("")
    as_dict = recipe_to_dict(load_recipe(path, Recipe))
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["data"]["path"] == str((path.parent / "d.jsonl").resolve())
    assert as_dict["model"] == {"name": "smollm2-135m", "dtype": "float32", "max_tokens": 256}
    assert as_dict["train"]["optim"] == {"beta1": 0.9}


def test_sections_validate_assignment() -> None:
    model = Model(name="x")
    with pytest.raises(ValueError):
        model.max_tokens = "abc"  # type: ignore[assignment]


class Sine(Section):
    kind: Literal["sine"] = "sine"
    freq: float = 1.0


class Noise(Section):
    kind: Literal["noise"] = "noise"
    seed: int = 0


def _kind(value: object) -> str:
    return value.get("kind", "sine") if isinstance(value, dict) else getattr(value, "kind", "sine")


class Tagged(Section):
    signal: Annotated[Annotated[Sine, Tag("sine")] | Annotated[Noise, Tag("noise")],
                      Discriminator(_kind, custom_error_type="signal_kind",
                                    custom_error_message="kind should be 'sine' or 'noise'")] = Sine()


def test_a_tagged_section_reads_as_written(tmp_path: Path) -> None:
    # pydantic puts the tag into the error's path ("signal.noise.freq"); the TOML has no such level.
    path = write(tmp_path, '[signal]\nkind = "noise"\nfreq = 2.0\n')
    with pytest.raises(AlignloopError, match=r"unknown key 'signal\.freq' \(known: kind, seed\)$"):
        load_recipe(path, Tagged)
    with pytest.raises(AlignloopError, match=r"signal\.kind: kind should be 'sine' or 'noise', got 'tone'"):
        load_recipe(path, Tagged, ["signal.kind=tone"])
    assert load_recipe(path, Tagged, ["signal.kind=sine"]).signal == Sine(freq=2.0)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_numbers_must_be_finite(tmp_path: Path, value: str) -> None:
    # `lr = inf` passed `gt=0` before and training died steps later; every recipe number is finite.
    message = error_of(write(tmp_path, GOOD), [f"train.lr={value}"])
    assert message.endswith("train.lr: expected a finite number, got " + repr(float(value)) + " (from --set)")
    path = write(tmp_path, GOOD.replace("lr = 0.01", f"lr = {value}"))
    assert "train.lr: expected a finite number" in error_of(path)
