"""Write the toy world's prompt suites (unsee/toy/suites/*.csv) from its prompt sets.

    python scripts/make_toy_suites.py

The files are in the CSV format of the field's suites (I2P's column names: case_number, prompt, evaluation_seed,
evaluation_guidance, categories), so ``unsee eval --suite`` runs the same path on them offline as on a real
suite. tests/test_suites.py checks that the shipped files equal what this script writes.
"""

from __future__ import annotations

from unsee.suites import write_suite_csv
from unsee.toy.evaluation import SUITES, suite_path, suite_rows


def main() -> None:
    for name, (concept, named, others, first_seed) in SUITES.items():
        path = write_suite_csv(suite_path(name), suite_rows(concept, named, others, first_seed))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
