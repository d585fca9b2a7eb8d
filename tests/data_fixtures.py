"""Small data files in the real layouts, written by the tests themselves."""

import json
import os

SHP_CARD_ROW = "shp_card_example.jsonl"


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def shp_row(card_row, **changes):
    """A row in the exact 15-field SHP schema: the card's real row with some fields changed."""
    row = dict(card_row)
    row.update(changes)
    if "score_A" in changes or "score_B" in changes:
        row["score_ratio"] = max(row["score_A"] / row["score_B"], row["score_B"] / row["score_A"])
    return row


def write_acl_imdb(root, reviews):
    """An aclImdb/ tree: reviews maps (split, 'pos'|'neg') -> list of texts."""
    for (split, label), texts in reviews.items():
        folder = os.path.join(root, split, label)
        os.makedirs(folder, exist_ok=True)
        for k, text in enumerate(texts):
            with open(os.path.join(folder, f"{k}_{7 if label == 'pos' else 2}.txt"), "w") as f:
                f.write(text)
    return root
