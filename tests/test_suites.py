"""Prompt suites from files (unsee.suites): the field's CSV formats, one-prompt-a-line files, filters and errors.

The files here are written by the tests in the formats the evaluation papers publish (column names as in I2P,
UnlearnDiffAtk, MMA-Diffusion, COCO caption lists, Ring-A-Bell); no third-party prompt is copied."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from unsee.suites import MAX_PROMPT_CHARS, SuiteError, SuiteRow, read_suite, write_suite_csv

ROOT = Path(__file__).resolve().parents[1]

I2P_STYLE = (
    "index,prompt,categories,hard,inappropriate_percentage,evaluation_seed,evaluation_guidance,sd_image_width,"
    "sd_image_height,case_number\n"
    '0,"a figure on a beach, oil painting",sexual,1,80.0,4290749014,7,512,512,17\n'
    '1,"a storm over a city\nat night, ""dramatic"" lighting","violence, shocking",0,20.5,2734971755,12,512,384,3\n'
    "2,a quiet harbour,shocking,0,0.0,42,1,128,128,8\n"
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_i2p_style_csv_with_multiline_prompts_and_seeds_past_int32(tmp_path):
    suite = read_suite(write(tmp_path, "i2p.csv", I2P_STYLE))
    assert suite.format == "csv" and len(suite.rows) == 3 and suite.total == 3
    first, second, third = suite.rows
    assert first.prompt == "a figure on a beach, oil painting"
    assert first.seed == 4290749014 and type(first.seed) is int and first.seed > 2**31
    assert first.guidance == 7.0 and (first.width, first.height) == (512, 512)
    assert second.prompt == 'a storm over a city\nat night, "dramatic" lighting'  # quoted: commas, quotes, newline
    assert second.categories == ("violence", "shocking") and second.line == 3
    assert (second.width, second.height) == (512, 384)
    assert third.line == 5  # physical line: the quoted prompt above spans two
    assert [r.row_id for r in suite.rows] == ["17", "3", "8"]  # case_number
    assert first.extra["hard"] == "1" and first.extra["inappropriate_percentage"] == "80.0"
    assert suite.columns["seed"] == "evaluation_seed" and suite.columns["guidance"] == "evaluation_guidance"
    assert len(suite.sha256) == 64 and suite.describe()["rows_in_file"] == 3


def test_category_filter_keeps_a_rows_index_and_is_case_insensitive(tmp_path):
    path = write(tmp_path, "i2p.csv", I2P_STYLE)
    suite = read_suite(path, categories=["SHOCKING"])
    assert [r.row_id for r in suite.rows] == ["3", "8"]
    assert [r.index for r in suite.rows] == [1, 2]  # the position in the file: default seeds do not move
    assert suite.categories == ("SHOCKING",) and suite.total == 3
    assert [r.row_id for r in read_suite(path, categories=["sexual", "violence"]).rows] == ["17", "3"]
    with pytest.raises(SuiteError, match=r"no row has the category 'nudity'; its categories are: sexual, shocking"):
        read_suite(path, categories=["nudity"])
    coco = write(tmp_path, "coco.csv", "image_id,caption\n1,a dog\n")
    with pytest.raises(SuiteError, match="no categories column"):
        read_suite(coco, categories=["sexual"])


def test_unlearndiffatk_style_csv(tmp_path):
    suite = read_suite(write(tmp_path, "vangogh.csv", "case_number,prompt,evaluation_seed,artist,evaluation_guidance\n"
                                                       "0,a village at night,3031,Van Gogh,7.5\n"
                                                       "1,a field of wheat,12,Van Gogh,7.5\n"))
    assert [(r.row_id, r.seed, r.guidance) for r in suite.rows] == [("0", 3031, 7.5), ("1", 12, 7.5)]
    assert suite.rows[0].extra == {"artist": "Van Gogh"} and suite.rows[0].categories == ()


def test_coco_caption_and_adv_prompt_columns(tmp_path):
    coco = read_suite(write(tmp_path, "coco.csv", "image_id,caption\n139,a kitchen with a stove\n285,a bear\n"))
    assert [(r.row_id, r.prompt, r.seed, r.guidance) for r in coco.rows] == [
        ("139", "a kitchen with a stove", None, None), ("285", "a bear", None, None)]
    assert coco.columns["prompt"] == "caption"
    mma = read_suite(write(tmp_path, "mma.csv", "adv_prompt,clean_prompt\nx y z,a cat\n"))
    assert mma.rows[0].prompt == "x y z" and mma.rows[0].extra == {"clean_prompt": "a cat"}
    custom = read_suite(write(tmp_path, "c.csv", "id,sentence\n1,a cat\n"), prompt_column="Sentence")
    assert custom.rows[0].prompt == "a cat"


def test_headerless_one_prompt_a_line(tmp_path):
    # Ring-A-Bell-like: no header, commas inside prompts; the first line is a prompt, not a header
    path = write(tmp_path, "invprompt.csv", "nude woman, beach, photo\n\n\"quoted, with comma\"\nsecond, prompt\n")
    suite = read_suite(path)
    assert suite.format == "lines"
    assert [r.prompt for r in suite.rows] == ["nude woman, beach, photo", "quoted, with comma", "second, prompt"]
    assert [r.row_id for r in suite.rows] == ["0", "1", "2"] and [r.line for r in suite.rows] == [1, 3, 4]
    assert all(r.seed is None and r.guidance is None for r in suite.rows)
    text = read_suite(write(tmp_path, "p.txt", "prompt\na cat\n"))  # .txt: every line a prompt, even "prompt"
    assert [r.prompt for r in text.rows] == ["prompt", "a cat"]
    assert read_suite(path, format="lines").rows == suite.rows


def test_repeated_ids_fall_back_to_row_numbers(tmp_path):
    suite = read_suite(write(tmp_path, "dup.csv", "case_number,prompt\n5,a\n5,b\n"))
    assert [r.row_id for r in suite.rows] == ["0", "1"] and suite.columns["id"] is None


def test_seeds_written_as_floats_and_empty_cells(tmp_path):
    suite = read_suite(write(tmp_path, "s.csv", "prompt,evaluation_seed,evaluation_guidance\na,42.0,\nb,,7\n"))
    assert [(r.seed, r.guidance) for r in suite.rows] == [(42, None), (None, 7.0)]


@pytest.mark.parametrize("text, expected", [
    ("", "is empty"),
    ("\n\n  \n", "is empty"),
    ("prompt,evaluation_seed\n", "a header but no rows"),
    ("case_number,text_prompt,evaluation_seed\n1,a cat,3\n",
     "line 1: no prompt column (columns: case_number, text_prompt, evaluation_seed); name the prompt column one of"),
    ("prompt,evaluation_seed\na cat,1\na dog,abc\n", "line 3, column 'evaluation_seed': 'abc' is not a valid seed"),
    ("prompt,evaluation_seed\na cat,-1\n", "line 2, column 'evaluation_seed': '-1' is not a valid seed"),
    ("prompt,evaluation_seed\na cat,1.5\n", "'1.5' is not a valid seed"),
    (f"prompt,evaluation_seed\na cat,{2**64}\n", "is not a valid seed; seeds are whole numbers from 0 to"),
    ("prompt,evaluation_guidance\na cat,nan\n", "column 'evaluation_guidance': 'nan' is not a valid guidance"),
    ("prompt,sd_image_width\na cat,4\n", "'4' is not a valid width"),
    ("prompt,evaluation_seed\n   ,1\n", "line 2, column 'prompt': the prompt is empty; fill in or remove that row"),
    ("prompt,seed\na,1,2\n", "line 2: 3 cells but the header has 2 columns"),
    ('prompt,seed\n"a cat,1\n', "not valid CSV"),
    ("prompt\n" + "x" * (MAX_PROMPT_CHARS + 1) + "\n", "characters, more than the limit of"),
    ("prompt,seed\na,1\n" + "x" * (10 * MAX_PROMPT_CHARS) + ",2\n", "line 3: not valid CSV (a cell is longer than"),
    ("a,b\n" + "x" * (MAX_PROMPT_CHARS + 1) + "\n", "line 2: the prompt is"),  # one prompt a line
], ids=["empty", "blank", "header-only", "no-prompt-column", "non-numeric-seed", "negative-seed", "fractional-seed",
        "seed-past-uint64", "nan-guidance", "tiny-width", "empty-prompt", "extra-cells", "unclosed-quote", "long-prompt",
        "huge-cell", "long-line"])
def test_bad_files_fail_with_one_line_naming_the_problem(tmp_path, text, expected):
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(SuiteError) as error:
        read_suite(path)
    message = str(error.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_missing_file_folder_binary_and_huge_files(tmp_path, monkeypatch):
    with pytest.raises(SuiteError, match="no such file"):
        read_suite(tmp_path / "missing.csv")
    with pytest.raises(SuiteError, match="is a folder"):
        read_suite(tmp_path)
    (tmp_path / "bin.csv").write_bytes(b"prompt\n\xff\xfe\x00")
    with pytest.raises(SuiteError, match="line 2: not UTF-8 text"):
        read_suite(tmp_path / "bin.csv")
    monkeypatch.setattr("unsee.suites.MAX_SUITE_BYTES", 10)
    with pytest.raises(SuiteError, match="more than the limit"):
        read_suite(write(tmp_path, "big.csv", "prompt\na cat on a mat\n"))


def test_write_suite_csv_round_trips(tmp_path):
    rows = [SuiteRow(index=0, row_id="a", prompt='two\nlines, "quoted"', seed=2**63 + 5, guidance=7.5,
                     categories=("x", "y"), width=512, height=256),
            SuiteRow(index=1, row_id="b", prompt="plain")]
    back = read_suite(write_suite_csv(tmp_path / "s.csv", rows)).rows
    assert [(r.row_id, r.prompt, r.seed, r.guidance, r.categories, r.width, r.height) for r in back] == [
        ("a", 'two\nlines, "quoted"', 2**63 + 5, 7.5, ("x", "y"), 512, 256), ("b", "plain", None, None, (), None, None)]


def test_the_shipped_toy_suite_is_what_the_world_makes(tmp_path):
    from unsee.toy.evaluation import SUITES, suite_path, suite_rows

    for name, (concept, named, others, first_seed) in SUITES.items():
        shipped = suite_path(name)
        made = write_suite_csv(tmp_path / f"{name}.csv", suite_rows(concept, named, others, first_seed))
        assert shipped.read_bytes() == made.read_bytes(), f"rerun scripts/make_toy_suites.py ({name})"
        suite = read_suite(shipped)
        assert len(suite.rows) == named + others
        assert len(read_suite(shipped, categories=[concept]).rows) == named
        assert all(concept in r.prompt for r in read_suite(shipped, categories=[concept]).rows)
        assert all(concept not in r.prompt for r in read_suite(shipped, categories=["other"]).rows)
        assert [r.seed for r in suite.rows] == list(range(first_seed, first_seed + named + others))


def test_the_toy_suites_are_package_data():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import fnmatch
    import tomllib

    from unsee.toy.evaluation import SUITES_DIR

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "unsee.toy.suites" in config["packages"]
    patterns = config["package-data"]["unsee.toy.suites"]
    files = sorted(SUITES_DIR.iterdir())
    assert files and all(any(fnmatch.fnmatch(f.name, p) for p in patterns) for f in files)
