"""The editor's line for each validation problem: field paths into the YAML text, for both recipe forms."""

from merger.service.web.problem_lines import problem_lines

PIPELINE = """\
stages:
  - name: first
    merge:
      merge_method: linear
      models:
        - model: a
        - model: b
          parameters: {weight: 2}
"""
PLAIN = """\
# a plain mergekit config is checked as stages[0].merge
merge_method: linear
models:
  - model: a
  - model: b
"""


def test_field_paths_point_at_their_lines():
    assert problem_lines(PIPELINE, ["stages[0].merge.models[1].parameters.weight", "stages[0].merge.models[0].model",
                                    "stages[0].name"]) == [8, 6, 2]


def test_a_missing_field_points_at_its_parent_and_a_plain_config_at_its_own_lines():
    assert problem_lines(PIPELINE, ["stages[0].merge.models[0].parameters"]) == [6]
    assert problem_lines(PLAIN, ["stages[0].merge.models[1].model", "stages[0].merge.merge_method", "stages[0].merge"]) == [5, 2, 2]


def test_text_that_is_not_yaml_points_at_its_syntax_error():
    assert problem_lines("models:\n  - model: a\n   bad: [\n", ["recipe"]) == [3]
    assert problem_lines("", ["stages"]) == [1]
