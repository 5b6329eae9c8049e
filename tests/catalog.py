"""The README's rule catalog is made from the tables, never kept by hand.

    python3 -m tests.catalog      # rewrite the table between the catalog markers in README.md

`tests/test_ruleset.py` requires the README to hold exactly what this renders.
"""

from __future__ import annotations

from pathlib import Path

from adapter.ruleset import RuleSet, load_ruleset

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- catalog: made by `python3 -m tests.catalog` from adapter/mappings/rules.yaml -->", "<!-- /catalog -->"


def render(rules: RuleSet) -> str:
    rows = ["| id | checks | when violated | status |", "|---|---|---|---|"]
    rows += [f"| {r.id} | {r.checks} | {r.when_violated} | {r.status} |" for r in rules.rules]
    return "\n".join(rows)


def readme_catalog(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main() -> None:
    text = README.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    README.write_text(f"{before}{START}\n{render(load_ruleset())}\n{END}{after}", encoding="utf-8")


if __name__ == "__main__":
    main()
