"""Blinded human evaluation, as in the paper's Table 1: evaluators pick the best answer per prompt.

`export_survey` samples prompts and, per question, shuffles the models' answers
behind the letters A, B, C, ... (both seeded, so a survey can be rebuilt). It
writes what evaluators get, `survey.csv` and a self-contained `survey.html`,
neither naming a model, and what the organizer keeps apart, `answer_key.json`.
`tally` maps the letters of one or more filled CSVs back to models and counts
wins; `format_table` prints them as the paper does (wins, win %, chance level).

File formats:
  survey.csv        question_id,prompt,answer_A,answer_B,...,choice  (choice empty; the evaluator
                    writes a letter; question_id is "q<index of the prompt in the input list>")
  answer_key.json   {"seed": int, "models": [name, ...],
                     "questions": {question_id: {letter: model}},
                     "digests": {question_id: hash of the question's answers in letter order}}
The digests let `tally` notice a CSV exported with another seed or from other answers,
which would otherwise map letters to the wrong models without any error.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import string
from collections.abc import Mapping, Sequence

import numpy as np

from cvxdpo.errors import ConfigError, DataError, MissingFileError

CSV_NAME, HTML_NAME, KEY_NAME = "survey.csv", "survey.html", "answer_key.json"
LETTERS = string.ascii_uppercase


# ----------------------------------------------------------------------------------------------- export


def export_survey(prompts: Sequence[str], answers: Mapping[str, Sequence[str]], out_dir: str,
                  n: int | None = None, seed: int = 0) -> dict:
    """Writes survey.csv, survey.html and answer_key.json to `out_dir`; returns their paths.

    The generator first draws the prompt sample, then one permutation per question in question
    order, so the same inputs and seed always give the same files.
    """
    models = _check_inputs(prompts, answers, n)
    rng = np.random.default_rng(seed)
    picked = sorted(int(i) for i in rng.permutation(len(prompts))[:n])
    letters = LETTERS[: len(models)]
    questions = []
    for index in picked:
        order = [models[int(m)] for m in rng.permutation(len(models))]
        questions.append({"id": f"q{index}", "prompt": prompts[index],
                          "answers": [answers[m][index] for m in order],
                          "key": dict(zip(letters, order))})
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, CSV_NAME), "html": os.path.join(out_dir, HTML_NAME),
             "answer_key": os.path.join(out_dir, KEY_NAME)}
    _write_csv(paths["csv"], questions, letters)
    _write_text(paths["html"], _html_page(questions, letters))
    _write_text(paths["answer_key"], json.dumps(_answer_key(questions, models, seed), indent=2) + "\n")
    return paths


def _check_inputs(prompts: Sequence[str], answers: Mapping[str, Sequence[str]], n: int | None) -> list[str]:
    """The model names, in the caller's order, once the inputs are known to make a survey."""
    models = list(answers)
    if not 2 <= len(models) <= len(LETTERS):
        raise ConfigError(f"a survey compares 2 to {len(LETTERS)} models, got {len(models)}")
    if not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"model names must be non-empty strings, got {models!r}")
    if not prompts:
        raise DataError("no prompts to build a survey from")
    for model in models:
        if len(answers[model]) != len(prompts):
            raise DataError(f"model {model!r} has {len(answers[model])} answers for {len(prompts)} prompts")
    if n is not None and n < 1:
        raise ConfigError(f"the number of questions must be at least 1, got {n}")
    return models


def _header(letters: str) -> list[str]:
    return ["question_id", "prompt", *(f"answer_{x}" for x in letters), "choice"]


def _write_csv(path: str, questions: list[dict], letters: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(_header(letters))
        for q in questions:
            writer.writerow([q["id"], q["prompt"], *q["answers"], ""])


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _answer_key(questions: list[dict], models: list[str], seed: int) -> dict:
    return {"seed": seed, "models": models,
            "questions": {q["id"]: q["key"] for q in questions},
            "digests": {q["id"]: _digest(q["answers"]) for q in questions}}


def _digest(answers: Sequence[str]) -> str:
    """A short hash of a question's answers in letter order.

    Whitespace is collapsed first, so line endings changed by a browser or a spreadsheet on the
    way back do not make a genuine CSV look foreign.
    """
    text = "\x1f".join(" ".join(a.split()) for a in answers)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- html

_STYLE = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; }
fieldset { margin: 1.5em 0; border: 1px solid #bbb; border-radius: 6px; }
.prompt, .text { white-space: pre-wrap; }
.prompt { background: #f3f3f3; padding: 0.6em; }
.answer { margin: 0.8em 0; padding: 0.6em; border-left: 4px solid #ccc; }
.answer label { font-weight: bold; }
"""

# Rebuilds survey.csv (same columns, quoting and CRLF rows as Python's csv module) from the page,
# with the chosen letters filled in, so evaluators never have to edit a CSV by hand.
_SCRIPT = """
function csvField(s) { return /[",\\r\\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
function toCsv(rows) { return rows.map(r => r.map(csvField).join(",") + "\\r\\n").join(""); }
function surveyRows() {
  const rows = [HEADER];
  for (const q of document.querySelectorAll("fieldset.question")) {
    const picked = q.querySelector("input:checked");
    const texts = Array.from(q.querySelectorAll(".text"), t => t.textContent);
    rows.push([q.dataset.qid, q.querySelector(".prompt").textContent, ...texts, picked ? picked.value : ""]);
  }
  return rows;
}
document.getElementById("download").addEventListener("click", () => {
  const blob = new Blob([toCsv(surveyRows())], {type: "text/csv"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "survey_filled.csv";
  link.click();
});
"""


def _html_page(questions: list[dict], letters: str) -> str:
    """One static page: no external assets, every text escaped, letters in place of model names."""
    body = "\n".join(_html_question(i, q, letters) for i, q in enumerate(questions, 1))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Which answer is best?</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Which answer is best?</h1>
<p>For each question, read the prompt and the {len(letters)} answers, then pick the one you find best.
Leave a question unanswered if you cannot decide. When you are done, press the button at the end
and send back the CSV file it downloads.</p>
<form id="survey">
{body}
</form>
<p><button type="button" id="download">Download my answers (CSV)</button></p>
<script>
const HEADER = {json.dumps(_header(letters))};
{_SCRIPT}</script>
</body>
</html>
"""


def _html_question(number: int, q: dict, letters: str) -> str:
    qid = html.escape(q["id"])
    answers = "\n".join(
        f'<div class="answer"><label><input type="radio" name="{qid}" value="{x}"> Answer {x}</label>'
        f'<div class="text">{html.escape(a)}</div></div>'
        for x, a in zip(letters, q["answers"]))
    return (f'<fieldset class="question" data-qid="{qid}">\n<legend>Question {number} ({qid})</legend>\n'
            f'<div class="prompt">{html.escape(q["prompt"])}</div>\n{answers}\n</fieldset>')


# ------------------------------------------------------------------------------------------------ tally


def tally(filled_csv: str | Sequence[str], answer_key: str) -> dict:
    """Wins per model over one or several evaluators' filled CSVs (several: summed).

    Returns {"questions": answered, "skipped": blank choices, "wins": {model: n},
    "win_rate": {model: wins / answered}, "evaluators": [the same counts per file, with "file"]}.
    Win rates are 0.0 when nothing was answered, so an evaluator who skipped everything still
    gets a row.
    """
    key = _load_key(answer_key)
    paths = [filled_csv] if isinstance(filled_csv, str) else list(filled_csv)
    if not paths:
        raise ConfigError("tally needs at least one filled survey CSV")
    evaluators = [{"file": p, **_counts(_read_choices(p, key, answer_key), key["models"])} for p in paths]
    wins = {m: sum(e["wins"][m] for e in evaluators) for m in key["models"]}
    skipped = sum(e["skipped"] for e in evaluators)
    return {**_rates(wins, skipped), "evaluators": evaluators}


def _counts(choices: list[str | None], models: list[str]) -> dict:
    wins = {m: 0 for m in models}
    for model in choices:
        if model is not None:
            wins[model] += 1
    return _rates(wins, choices.count(None))


def _rates(wins: dict[str, int], skipped: int) -> dict:
    answered = sum(wins.values())
    return {"questions": answered, "skipped": skipped, "wins": wins,
            "win_rate": {m: (w / answered if answered else 0.0) for m, w in wins.items()}}


def _load_key(path: str) -> dict:
    """The answer key, checked enough that every later lookup in it is safe."""
    if not os.path.isfile(path):
        raise MissingFileError(f"answer key not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            key = json.load(f)
        models, questions, digests = key["models"], key["questions"], key["digests"]
        letters = set(LETTERS[: len(models)])
        fits = (isinstance(models, list) and isinstance(questions, dict) and set(digests) == set(questions)
                and all(set(q) == letters and set(q.values()) == set(models) for q in questions.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a survey answer key ({type(e).__name__}: {e})".replace("\n", " ")) from e
    if not fits:
        raise DataError(f"{path}: not a survey answer key (models, questions and digests do not fit together)")
    return key


def _read_choices(path: str, key: dict, key_path: str) -> list[str | None]:
    """The chosen model per question of one filled CSV (None = skipped), checked against the key."""
    if not os.path.isfile(path):
        raise MissingFileError(f"filled survey not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            seen, choices = set(), []
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file, expected a survey CSV header")
            letters = _header_letters(path, header, key, key_path)
            while True:
                line = reader.line_num + 1  # where the next record starts (a field may span lines)
                row = next(reader, None)
                if row is None:
                    break
                if row:
                    qid, choice = _check_row(f"{path}:{line}", row, header, letters, key, key_path, seen)
                    choices.append(key["questions"][qid][choice] if choice else None)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e}); save it as 'CSV UTF-8'") from e
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not a readable CSV ({e})") from e
    missing = sorted(set(key["questions"]) - seen)
    if missing:
        raise DataError(f"{path}: {len(missing)} questions of answer key {key_path} are missing "
                        f"(first: {missing[0]}); is it the CSV of that export?")
    return choices


def _header_letters(path: str, header: list[str], key: dict, key_path: str) -> str:
    """The answer letters named by the header; they must be the key's, in export order."""
    letters = LETTERS[: len(key["models"])]
    if header != _header(letters):
        raise DataError(f"{path}: header {','.join(header)!r} does not match answer key {key_path} "
                        f"(expected {','.join(_header(letters))!r})")
    return letters


def _check_row(where: str, row: list[str], header: list[str], letters: str, key: dict, key_path: str,
               seen: set[str]) -> tuple[str, str]:
    """(question id, upper-case letter or "") of one row; a one-line DataError at `where` if it is bad."""
    if len(row) != len(header):
        raise DataError(f"{where}: {len(row)} columns, the header has {len(header)}")
    qid, choice = row[0].strip(), "".join(row[-1].split()).upper()
    if qid not in key["questions"]:
        raise DataError(f"{where}: question id {qid!r} is not in answer key {key_path}")
    if qid in seen:
        raise DataError(f"{where}: question id {qid!r} appears twice")
    if _digest(row[2:-1]) != key["digests"][qid]:
        raise DataError(f"{where}: the answers of {qid} are not those of answer key {key_path} "
                        f"(another seed or export?)")
    if choice and choice not in set(letters):
        raise DataError(f"{where}: choice {row[-1]!r} is not one of the letters {', '.join(letters)}")
    seen.add(qid)
    return qid, choice


# ------------------------------------------------------------------------------------------------ table


def format_table(result: Mapping) -> str:
    """Markdown: wins and win % per model, the chance level, and a row per evaluator when several."""
    models = list(result["wins"])
    lines = ["| model | wins | win % |", "|---|---:|---:|"]
    lines += [f"| {m} | {result['wins'][m]} | {100 * result['win_rate'][m]:.1f} |" for m in models]
    lines += ["", f"{result['questions']} answered, {result['skipped']} skipped. "
                  f"Average win % per model (chance level): {100 / len(models):.1f}"]
    evaluators = result.get("evaluators", [])
    if len(evaluators) > 1:
        lines += ["", "| evaluator | answered | skipped | " + " | ".join(f"{m} wins" for m in models) + " |",
                  "|---|---:|---:|" + "---:|" * len(models)]
        lines += [f"| {e['file']} | {e['questions']} | {e['skipped']} | "
                  + " | ".join(str(e["wins"][m]) for m in models) + " |" for e in evaluators]
    return "\n".join(lines)
