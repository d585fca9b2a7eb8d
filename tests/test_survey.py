"""The blinded human evaluation: export hides the models, the key maps letters back, tally counts exactly."""

import csv
import filecmp
import html.parser
import json
import shutil
import subprocess

import pytest

from cvxdpo.errors import ConfigError, CvxdpoError, DataError, MissingFileError
from cvxdpo.eval import survey

MODELS = ("sft-baseline", "dpo-reference", "convex-dpo")
PROMPTS = ["How do I boil an egg?\nPlease be brief.", "Name a prime number.", "What is 2 + 2?",
           "Write a haiku about rain.", "Is <b>bold</b> & 'quoted' text escaped?"]
ANSWERS = {m: [f"Answer {i} from the model number {k}: \"ok\", <script>alert({k})</script> &" for i in range(5)]
           for k, m in enumerate(MODELS)}
A, B, C = MODELS


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _key(paths):
    with open(paths["answer_key"], encoding="utf-8") as f:
        return json.load(f)


def _letter_of(key, qid, model):
    return next(x for x, m in key["questions"][qid].items() if m == model)


def _fill(paths, out, picks):
    """A filled CSV as an evaluator writes it: `picks` is one choice cell per question, in file order."""
    rows = _read_csv(paths["csv"])
    for row, pick in zip(rows, picks, strict=True):
        row["choice"] = pick
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(out)


def _evaluator_picks(paths):
    """b's letter on 3 questions (in mixed case and padding), a's on 1, one left blank."""
    key = _key(paths)
    qids = [r["question_id"] for r in _read_csv(paths["csv"])]
    return [f" {_letter_of(key, qids[0], B).lower()} ", _letter_of(key, qids[1], B),
            _letter_of(key, qids[2], B).lower(), _letter_of(key, qids[3], A), "  "]


@pytest.fixture
def exported(tmp_path):
    return survey.export_survey(PROMPTS, ANSWERS, str(tmp_path / "survey"), n=None, seed=0)


def test_survey_files_do_not_name_the_models(exported):
    for name in ("csv", "html"):
        with open(exported[name], encoding="utf-8") as f:
            text = f.read()
        for model in MODELS:
            assert model not in text, f"{name} reveals {model}"
    assert sorted(_key(exported)["models"]) == sorted(MODELS)


def test_each_question_is_a_shuffle_of_the_answers_to_its_prompt(exported):
    key = _key(exported)
    rows = _read_csv(exported["csv"])
    assert list(rows[0]) == ["question_id", "prompt", "answer_A", "answer_B", "answer_C", "choice"]
    assert sorted(r["question_id"] for r in rows) == sorted(f"q{i}" for i in range(5)) == sorted(key["questions"])
    for row in rows:
        index = int(row["question_id"][1:])
        assert row["prompt"] == PROMPTS[index] and row["choice"] == ""
        shown = [row[f"answer_{x}"] for x in "ABC"]
        assert sorted(shown) == sorted(ANSWERS[m][index] for m in MODELS)
        assert shown == [ANSWERS[key["questions"][row["question_id"]][x]][index] for x in "ABC"]


def test_seed_reproduces_the_survey_and_another_seed_reshuffles(tmp_path, exported):
    again = survey.export_survey(PROMPTS, ANSWERS, str(tmp_path / "again"), n=None, seed=0)
    for name in ("csv", "html", "answer_key"):
        assert filecmp.cmp(exported[name], again[name], shallow=False), name
    other = survey.export_survey(PROMPTS, ANSWERS, str(tmp_path / "other"), n=None, seed=1)
    assert _key(other)["questions"] != _key(exported)["questions"]
    assert _key(other)["seed"] == 1


def test_n_samples_that_many_prompts(tmp_path):
    paths = survey.export_survey(PROMPTS, ANSWERS, str(tmp_path), n=3, seed=0)
    assert len(_read_csv(paths["csv"])) == len(_key(paths)["questions"]) == 3
    bigger = survey.export_survey(PROMPTS, ANSWERS, str(tmp_path / "all"), n=50, seed=0)
    assert len(_read_csv(bigger["csv"])) == 5


def test_tally_counts_one_evaluator_exactly(tmp_path, exported):
    filled = _fill(exported, tmp_path / "filled.csv", _evaluator_picks(exported))
    result = survey.tally(filled, exported["answer_key"])
    assert result["questions"] == 4 and result["skipped"] == 1
    assert result["wins"] == {A: 1, B: 3, C: 0}
    assert result["win_rate"] == {A: 0.25, B: 0.75, C: 0.0}
    table = survey.format_table(result)
    assert f"| {B} | 3 | 75.0 |" in table and f"| {A} | 1 | 25.0 |" in table and f"| {C} | 0 | 0.0 |" in table
    assert table.splitlines()[-1].endswith("(chance level): 33.3")


def test_tally_sums_evaluators_and_keeps_their_rows(tmp_path, exported):
    first = _fill(exported, tmp_path / "first.csv", _evaluator_picks(exported))
    key = _key(exported)
    qids = [r["question_id"] for r in _read_csv(exported["csv"])]
    second = _fill(exported, tmp_path / "second.csv", [_letter_of(key, q, C) for q in qids])
    result = survey.tally([first, second], exported["answer_key"])
    assert result["wins"] == {A: 1, B: 3, C: 5}
    assert result["questions"] == 9 and result["skipped"] == 1
    assert result["win_rate"][C] == pytest.approx(5 / 9)
    assert [(e["file"], e["wins"][C], e["skipped"]) for e in result["evaluators"]] == [(first, 0, 1), (second, 5, 0)]
    table = survey.format_table(result)
    assert f"| {first} | 4 | 1 | 1 | 3 | 0 |" in table and f"| {second} | 5 | 0 | 0 | 0 | 5 |" in table


def _line_of(path, qid):
    with open(path, newline="", encoding="utf-8") as f:
        return next(i for i, line in enumerate(f.read().splitlines(), 1) if line.startswith(qid + ","))


@pytest.mark.parametrize("column, value, message", [("choice", "Z", "choice 'Z' is not one of the letters A, B, C"),
                                                    ("choice", "AB", "choice 'AB' is not one of"),
                                                    ("question_id", "q99", "question id 'q99' is not in answer key")])
def test_a_bad_row_names_file_and_line(tmp_path, exported, column, value, message):
    picks = _evaluator_picks(exported)
    filled = _fill(exported, tmp_path / "filled.csv", picks)
    rows = _read_csv(filled)
    target = rows[2]["question_id"]
    rows[2][column] = value
    with open(filled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    line = _line_of(filled, value if column == "question_id" else target)
    assert line > 3  # the multi-line prompt comes earlier: the line is a physical line, not a row number
    with pytest.raises(DataError, match=f"^{filled}:{line}: {message}") as err:
        survey.tally(filled, exported["answer_key"])
    assert "\n" not in str(err.value)


def test_a_key_from_another_export_is_refused(tmp_path, exported):
    filled = _fill(exported, tmp_path / "filled.csv", _evaluator_picks(exported))
    other = survey.export_survey(PROMPTS, ANSWERS, str(tmp_path / "other"), n=None, seed=1)
    with pytest.raises(DataError, match="are not those of answer key"):
        survey.tally(filled, other["answer_key"])
    fewer = survey.export_survey(PROMPTS, ANSWERS, str(tmp_path / "fewer"), n=3, seed=0)
    with pytest.raises(DataError, match="not in answer key|are not those of"):
        survey.tally(filled, fewer["answer_key"])
    two = survey.export_survey(PROMPTS, {m: ANSWERS[m] for m in MODELS[:2]}, str(tmp_path / "two"), seed=0)
    with pytest.raises(DataError, match="does not match answer key"):
        survey.tally(filled, two["answer_key"])


def test_bad_inputs_are_one_line_user_errors(tmp_path, exported):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("question_id,prompt,answer_A,answer_B,answer_C,choice\r\nq0,caf\u00e9,,,,A\r\n"
                       .encode("latin-1"))
    cases = [
        (DataError, lambda: survey.export_survey(PROMPTS, {A: ANSWERS[A], B: ANSWERS[B][:4]}, str(tmp_path), None, 0)),
        (ConfigError, lambda: survey.export_survey(PROMPTS, {A: ANSWERS[A]}, str(tmp_path), None, 0)),
        (ConfigError, lambda: survey.export_survey(PROMPTS, ANSWERS, str(tmp_path), 0, 0)),
        (MissingFileError, lambda: survey.tally(str(tmp_path / "nope.csv"), exported["answer_key"])),
        (MissingFileError, lambda: survey.tally(exported["csv"], str(tmp_path / "nope.json"))),
        (DataError, lambda: survey.tally(exported["csv"], exported["csv"])),
        (DataError, lambda: survey.tally(str(latin1), exported["answer_key"])),
    ]
    for kind, call in cases:
        with pytest.raises(kind) as err:
            call()
        assert isinstance(err.value, CvxdpoError) and "\n" not in str(err.value)


def test_a_csv_missing_questions_is_refused(tmp_path, exported):
    rows = _read_csv(exported["csv"])[:-1]
    short = tmp_path / "short.csv"
    with open(short, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match="1 questions of answer key .* are missing"):
        survey.tally(str(short), exported["answer_key"])


class _Page(html.parser.HTMLParser):
    """Collects the radio buttons, the shown texts and any reference to an outside resource."""

    def __init__(self):
        super().__init__()
        self.radios, self.external, self.texts, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input" and attrs.get("type") == "radio":
            self.radios.append((attrs["name"], attrs["value"]))
        if "src" in attrs or "href" in attrs or tag == "link":
            self.external.append(tag)
        self._in = attrs.get("class") if attrs.get("class") in ("prompt", "text") else None

    def handle_data(self, data):
        if self._in:
            self.texts.append(data)


def test_html_has_a_radio_per_answer_and_escapes_every_text(exported):
    page = _Page()
    with open(exported["html"], encoding="utf-8") as f:
        text = f.read()
    page.feed(text)
    page.close()
    qids = [r["question_id"] for r in _read_csv(exported["csv"])]
    assert len(page.radios) == len(PROMPTS) * len(MODELS)
    assert sorted(page.radios) == sorted((q, x) for q in qids for x in "ABC")
    assert page.external == []
    assert "<script>alert" not in text and "<b>bold</b>" not in text  # escaped, not markup
    shown = "".join(page.texts)
    assert all(p in shown for p in PROMPTS) and ANSWERS[A][0] in shown


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_script_writes_csv_like_python(tmp_path, exported):
    """The in-page CSV writer (run under node with a stub document) quotes like Python's csv module."""
    with open(exported["html"], encoding="utf-8") as f:
        script = f.read().split("<script>")[1].split("</script>")[0]
    rows = [["question_id", "prompt", "choice"], ["q1", 'He said "hi", twice\nthen left', "B"], ["q2", "plain", ""]]
    program = ("const document = {getElementById: () => ({addEventListener() {}})};\n" + script
               + f"\nprocess.stdout.write(toCsv({json.dumps(rows)}));\n")
    (tmp_path / "page.js").write_text(program, encoding="utf-8")
    out = subprocess.run(["node", str(tmp_path / "page.js")], capture_output=True, check=True, timeout=60).stdout
    with open(tmp_path / "py.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    assert out == (tmp_path / "py.csv").read_bytes()
