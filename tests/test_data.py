import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from restem_ray.data import load_problems
from restem_ray.errors import UserError


def jsonl(tmp_path, lines, name="p.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return p


GOOD = json.dumps({"id": 1, "prompt": "Q", "answer": "3"})


@pytest.mark.parametrize("bad,needle", [
    ("{not json", ":2: not valid JSON"),
    (json.dumps({"id": 2, "answer": "3"}), ":2: missing or empty field 'prompt'"),
    (json.dumps({"id": 2, "prompt": "  ", "answer": "3"}), ":2: missing or empty field 'prompt'"),
    (json.dumps({"id": 2, "prompt": "Q"}), ":2: missing or empty field 'answer'"),
    (json.dumps({"id": 1, "prompt": "Q", "answer": "3"}), ":2: duplicate id '1'"),
    (json.dumps([1, 2]), ":2: expected a JSON object"),
    (b"\xff\xfe bad", ":2: not UTF-8"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, needle):
    p = jsonl(tmp_path, [GOOD, bad])
    with pytest.raises(UserError) as e:
        load_problems(p, "math")
    assert str(p) + needle in str(e.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(UserError, match="problem file not found"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown problem file type"):
        load_problems(tmp_path / "x.csv")


def test_parquet_and_code_fields(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "def f():", "test": "def check(candidate):\n    assert 1\n",
                                          "entry_point": "f"}]), p)
    assert load_problems(p, "code")[0]["id"] == "a"
    with pytest.raises(UserError, match="test/entry_point or input_output"):
        load_problems(jsonl(tmp_path, [json.dumps({"id": 1, "prompt": "x"})]), "code")
