"""bench.common.result_json: the same JSON, lists of numbers on one line, strings untouched."""

from __future__ import annotations

import json

from bench.common import result_json


def test_number_lists_on_one_line_and_strings_untouched():
    record = {
        "wall_ms": [5.5, 6.25, -3e-05, 4e10, 7],
        "mixed": ["s", 1],
        "empty": [],
        "nested": {"e": [[1, 2], [3, 4]]},
        "command": 'python -m bench.slora --lora-fields {"x":[1,2]} --n 5,100',
    }
    text = result_json(record)
    assert json.loads(text) == record
    assert '"wall_ms": [5.5, 6.25, -3e-05, 40000000000.0, 7]' in text
    assert "[1,2]" in text  # inside the command string, as it was
    assert '"mixed": [\n' in text  # a list with a string keeps json.dumps's layout
    assert "[1, 2]" in text and "[3, 4]" in text
