"""Every shipped recipe is valid, and the published JSON Schema is the one the code generates."""

import json
from pathlib import Path

import jsonschema
import pytest

from merger.recipe import parse_recipe, recipe_json_schema
from merger.safe_yaml import load_recipe_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_published_schema_is_current():
    published = json.loads((REPO / "docs" / "recipe.schema.json").read_text())
    assert published == recipe_json_schema(), "regenerate: merger schema > docs/recipe.schema.json"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_is_valid(path):
    data = load_recipe_file(path, max_bytes=256 * 1024)
    recipe = parse_recipe(data, default_name=path.stem)
    assert recipe.stages
    jsonschema.Draft202012Validator(recipe_json_schema()).validate(data)


def test_schema_rejects_what_the_parser_rejects():
    bad = {"stages": [{"name": "a", "merge": {"merge_method": "linear", "models": [{"model": "x", "wieght": 1}]}}]}
    assert list(jsonschema.Draft202012Validator(recipe_json_schema()).iter_errors(bad))
